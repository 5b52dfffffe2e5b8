#!/usr/bin/env bash
# `make gpu-check`: the one-command GPU check (scripts/gpu_check.py), results in $OUT (else gpu-check-results/).
# On a machine without network, `make gpu-bundle` beforehand packs the wheels leanft needs there (and the
# default model) into .gpu/part-K-of-N files of at most 60 MiB; each one carried there is kept in $STAGE, and
# once all N are in, they are installed into $STAGE/site. Parts carried by earlier calls to the same (still
# warm) machine count: `scripts/gpu_check.sh stage` keeps this call's part and runs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGE=${STAGE:-/tmp/leanft-gpu}
mkdir -p "$STAGE"
for part in "${BUNDLE:-.gpu}"/part-*; do [ -f "$part" ] && cp "$part" "$STAGE/"; done
[ "${1:-}" = stage ] && { ls "$STAGE"; exit 0; }
parts=("$STAGE"/part-*)
if [ -f "${parts[0]}" ]; then
  wanted=${parts[0]##*-of-}
  if [ "${#parts[@]}" != "$wanted" ]; then
    echo "gpu-check: $STAGE holds ${#parts[@]} of the bundle's $wanted parts: carry the others first" >&2
    exit 2
  fi
  if [ ! -d "$STAGE/site" ]; then
    cat "$STAGE"/part-* | tar -x -C "$STAGE" || exit 2  # part-0 .. part-9: the glob's order
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STAGE/site" \
      "$STAGE"/wheels/*.whl || exit 2
  fi
  export PYTHONPATH="$PWD/src:$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
