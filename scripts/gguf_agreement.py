"""Do a run's GGUF exports answer like the merged model? Greedy answers on prompts the run never trained on.

    PYTHONPATH=src python scripts/gguf_agreement.py RUN_DIR [TYPE ...] [--prompts N]   (default: f16 q8_0, 100)

Merges the run, exports it with ``save_gguf`` (from the run's GGUF base when it has one), loads each file back
through transformers' GGUF loader (model and tokenizer), and prints one JSON line per type: how many prompts
get the same greedy answer as the merged model, the accuracy of both on the run's scorer, and the largest logit
difference on the first prompts from the merged model with its weights rounded to the file's type (f16 and bf16;
for q8_0 / q4_0 the difference from the f16-rounded model). The prompts are
the run's held-out records, topped up (for a built-in task) with further generated records it did not train on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

LOGIT_PROMPTS = 8


def unseen_records(config, count: int) -> list[dict]:
    """``count`` records the run did not train on: its held-out ones, then (built-in tasks) newly generated ones."""
    from leanft.run.sources import load_records

    train, held = load_records(config)
    seen = {json.dumps(record, sort_keys=True) for record in train}
    more_train, more_held = load_records(dataclasses.replace(config, num_train=config.num_train + count))
    fresh = [record for record in held + more_held + more_train if json.dumps(record, sort_keys=True) not in seen]
    return list({json.dumps(r, sort_keys=True): r for r in fresh}.values())[:count]


def prompt_logits(model, tokenizer, prompts: list[str]) -> list:
    """The logits of each rendered prompt, one prompt at a time (no padding)."""
    import torch

    from leanft.run.data import render_prompt

    with torch.no_grad():
        return [model(**tokenizer(render_prompt(tokenizer, p), add_special_tokens=False, return_tensors="pt")).logits
                for p in prompts]  # fmt: skip


def rounded(model, dtype):
    """A float32 copy of ``model`` with its weights rounded to ``dtype``."""
    import copy

    import torch

    return copy.deepcopy(model).to(dtype).to(torch.float32)


def main(argv: list[str]) -> int:
    """Compare the merged model of a run with its GGUF exports (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("types", nargs="*", default=["f16", "q8_0"])
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from leanft.run.evaluate import eval_settings, generate_answers, match_rate, reference_pairs
    from leanft.run.gguf_export import save_gguf, source_gguf_for
    from leanft.run.methods import method_spec
    from leanft.run.rundir import load_run

    model, tokenizer, config = load_run(args.run_dir, device="cpu")
    merged = method_spec(config.method).merge(model).to(torch.float32).eval()
    prompts, references = reference_pairs(unseen_records(config, args.prompts))
    settings = eval_settings(config)
    answer = lambda m, t: generate_answers(m, t, prompts, max_new_tokens=settings.max_new_tokens)  # noqa: E731
    expected = answer(merged, tokenizer)
    logit_prompts = prompts[:LOGIT_PROMPTS]
    # The merged model's logits with its weights rounded as a file type stores them (f16 for the quantized types),
    # once per rounding: f16 and q8_0 compare with the same ones.
    rounded_logits = functools.cache(lambda dtype: prompt_logits(rounded(merged, dtype), tokenizer, logit_prompts))
    print(json.dumps({"model": "merged", "prompts": len(prompts),
                      "accuracy": match_rate(expected, references, settings.correct)}), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for gguf_type in args.types:
            started = time.perf_counter()
            path, _ = save_gguf(merged, tokenizer, Path(folder) / f"model.{gguf_type}.gguf", gguf_type,
                                source_gguf_for(config.model))  # fmt: skip
            seconds = time.perf_counter() - started
            back = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=path.name, dtype=torch.float32,
                quantization_config=transformers.GgufConfig(dequantize=True),
            ).eval()  # fmt: skip
            back_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
            got = answer(back, back_tokenizer)
            rounding = torch.bfloat16 if gguf_type == "bf16" else torch.float16
            pairs = zip(prompt_logits(back, back_tokenizer, logit_prompts), rounded_logits(rounding), strict=True)
            logit_diff = max(float((a - b).abs().max()) for a, b in pairs)  # fmt: skip
            print(json.dumps({
                "model": f"gguf {gguf_type}", "export_s": round(seconds, 1), "mib": path.stat().st_size >> 20,
                "max_logit_diff": round(logit_diff, 5),
                "same_answer": sum(a == b for a, b in zip(got, expected, strict=True)), "prompts": len(prompts),
                "accuracy": match_rate(got, references, settings.correct),
            }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
