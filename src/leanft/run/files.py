"""The names of what a leanft run folder holds (one home, so every module writes and reads the same layout)."""

RUN_CONFIG_FILE = "run_config.yaml"  # the resolved config the run trained with
SUMMARY_FILE = "summary.json"  # written last: its presence marks a finished run
BASELINE_FILE = "baseline.json"  # the untrained model's held-out figures
METRICS_FILE = "metrics.jsonl"  # one line per logged step and evaluation
LOSS_CURVE_FILE = "loss_curve.png"
ADAPTER_DIR = "adapter"  # the trained method's own save (PaCA columns, a peft adapter, a full model)
COMPLETE_MARKER = "leanft_complete"  # inside a checkpoint folder: every file of it is written
LOCK_FILE = ".leanft.lock"  # held while a process trains in the folder
