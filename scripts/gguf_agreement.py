"""Do a run's GGUF exports answer like the merged model? Greedy answers on the run's held-out prompts, compared.

    PYTHONPATH=src python scripts/gguf_agreement.py RUN_DIR [TYPE ...]     (default types: f16 q8_0)

Merges the run, exports it with ``save_gguf`` (from the run's GGUF base when it has one), loads each file back
through transformers' GGUF loader (model and tokenizer), and prints one JSON line per type: how many held-out
prompts get the same greedy answer as the merged model, and the accuracy of both on the run's scorer.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """Compare the merged model of ``argv[0]`` with its GGUF exports of the types that follow (default f16, q8_0)."""
    import torch
    import transformers

    from leanft.run.evaluate import eval_options, generate_answers, match_rate, reference_pairs
    from leanft.run.gguf_export import save_gguf, source_gguf_for
    from leanft.run.methods import method_spec
    from leanft.run.rundir import load_run
    from leanft.run.sources import load_records

    run_dir, types = argv[0], argv[1:] or ["f16", "q8_0"]
    model, tokenizer, config = load_run(run_dir, device="cpu")
    merged = method_spec(config.method).merge(model).to(torch.float32).eval()
    prompts, references = reference_pairs(load_records(config)[1])
    options = eval_options(config)
    answer = lambda m, t: generate_answers(m, t, prompts, max_new_tokens=options["max_new_tokens"])  # noqa: E731
    expected = answer(merged, tokenizer)
    print(json.dumps({"model": "merged", "prompts": len(prompts),
                      "accuracy": match_rate(expected, references, options["correct"])}))  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for gguf_type in types:
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
            print(json.dumps({
                "model": f"gguf {gguf_type}", "export_s": round(seconds, 1), "mib": path.stat().st_size >> 20,
                "same_answer": sum(a == b for a, b in zip(got, expected, strict=True)), "prompts": len(prompts),
                "accuracy": match_rate(got, references, options["correct"]),
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
