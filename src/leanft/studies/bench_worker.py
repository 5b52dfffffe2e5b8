"""The part of ``leanft bench`` that runs inside a fresh worker process: one model, one method, steps on request.

A worker loads the model and sets it up exactly as ``leanft train`` does, through ``leanft.run.prepare.prepare_model``
with the row's train config (method, precision, compile, DropBP with its sampler, checkpointing), builds the
run's optimizer over the trainable parameters and a fixed random batch (or, with ``data=``, the data's own
batches, padded or padding-free as the row's config says: ``leanft.studies.bench_data``), then answers
requests from the parent over a pipe: ``step`` (one timed training step at a DropBP rate, drawing that
step's pattern exactly as training does) or ``memory`` (one step measured for peak memory and bytes saved
for backward). Workers start from a fork server that has already imported torch, transformers and peft,
so each one costs a model load, not an interpreter start, and each measures its own peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import re
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from leanft.core.chunked_loss import chunked_causal_lm_loss
from leanft.run import models
from leanft.run.config import TrainConfig
from leanft.run.optimizers import build_optimizer, state_bytes
from leanft.run.prepare import prepare_model
from leanft.studies.bench_data import RealBatches
from leanft.studies.bench_report import TINY_MODEL, uses_real_data
from leanft.studies.memory import SavedTensorMeter

TINY_CONFIG = dict(  # a ~4M-parameter Llama shaped like SmolLM2 (tied embeddings, grouped KV heads)
    vocab_size=4096,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Case:
    """Everything a worker needs to build its model, method and batch: the row's train config (its method,
    ``quantize``, ``bf16`` true or false, optimizer, r, seed, ...) plus batch, length and process settings."""

    config: TrainConfig = field(default_factory=TrainConfig)
    batch: int = 4
    seq_len: int = 256
    device: str = "cpu"
    dropbp: bool = True  # attach a DropBP controller (rate 0 = every branch kept)
    threads: int = 0  # torch intra-op threads; 0 = torch's default (one per core)
    release_memory: bool = False  # hand freed blocks back to the OS at once (memory probes, see release_freed_memory)


def row_config(case: Case) -> TrainConfig:
    """The train config ``case``'s worker sets its model up with: its batch and length; compile stays off on a
    4-bit base."""
    config = case.config
    return dataclasses.replace(config, batch_size=case.batch, max_seq_len=case.seq_len,
                               compile=config.compile and not config.quantize)


def load_model(spec: str, dtype: torch.dtype, device: str, quantize: bool = False) -> nn.Module:
    """The benchmark's model in train mode, loaded as ``leanft train`` loads it (``leanft.run.models.load_model``).

    ``"tiny"`` is a small random Llama, saved to a temporary folder first; ``quantize`` loads the linear layers in
    bitsandbytes nf4.
    """
    quantized = "4bit" if quantize else None
    if spec != TINY_MODEL:
        return models.load_model(None if spec == "default" else spec, dtype, device, quantized).train()
    torch.manual_seed(0)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_CONFIG))
    with tempfile.TemporaryDirectory() as folder:
        tiny.save_pretrained(folder)
        return models.load_model(folder, dtype, device, quantized).train()


def make_batch(vocab_size: int, batch: int, seq_len: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids; every token is a label."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# -- memory probes ------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def current_bytes(device: str) -> int:
    """Memory in use now: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def reset_peak(device: str) -> None:
    """Start a new peak-memory window (``/proc/self/clear_refs`` resets the RSS high-water mark)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes(device: str) -> int:
    """Peak memory since ``reset_peak``: ``max_memory_allocated`` on a GPU, the RSS high-water mark on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def release_freed_memory() -> None:
    """Make glibc return every freed block of 128 KiB or more to the OS at once (CPU memory probes).

    By default glibc raises its mmap threshold after large frees and keeps freed heap memory, so the RSS
    high-water mark depends on fragmentation and is not monotone in the sequence length. With a fixed
    threshold, peak RSS follows the live tensors, like ``max_memory_allocated`` on a GPU.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, which also turns off its dynamic growth
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# -- the worker's model --------------------------------------------------------------------------------


class Trainee:
    """One model with one method, its optimizer, its DropBP controller (optional) and its batch."""

    def __init__(self, case: Case) -> None:
        self.case = case
        config = self.config = row_config(case)
        tokenizer = None
        if uses_real_data(config):
            model, tokenizer = models.load_model_and_tokenizer(
                None if config.model == "default" else config.model, config.base_dtype(), case.device,
                "4bit" if config.quantize else None)
            model.train()
        else:
            model = load_model(config.model, config.base_dtype(), case.device, quantize=bool(config.quantize))
        prepared = prepare_model(model, config, dropbp_rate=0.0 if case.dropbp else None)  # train's set-up
        self.model, self.controller = prepared.model, prepared.controller
        self.autocast = torch.bfloat16 if config.uses_bf16() else None  # as the Trainer runs a bf16 config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config.optimizer, config.learning_rate())
        self.data = None if tokenizer is None else RealBatches(config, self.model, tokenizer)
        self.batch = None if self.data else make_batch(model.config.vocab_size, case.batch, case.seq_len, config.seed,
                                                       case.device)
        with torch.no_grad():  # page in weights a safetensors load left memory-mapped, so set-up memory counts them
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                tensor.sum()

    def _pattern(self, rate: float, floor: bool, index: int) -> contextlib.AbstractContextManager:
        """Set up the controller so the next training forward draws step ``index``'s pattern at ``rate``."""
        if self.controller is None:
            if rate or floor:
                raise ValueError("this worker has no DropBP controller")
            return contextlib.nullcontext()
        self.controller.set_rates([rate] * len(self.controller.branches))
        self.controller.step = index
        return self.controller.forced([True] * len(self.controller.branches)) if floor else contextlib.nullcontext()

    def _batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict, contextlib.AbstractContextManager]:
        """Step ``index``'s batch, its token counts (examples' own, computed) and the attention set-up it runs in."""
        if self.data is None:
            tokens = self.batch["input_ids"].numel()
            return self.batch, {"tokens": tokens, "computed": tokens}, contextlib.nullcontext()
        batch, tokens = self.data.batch(index, self.case.device)
        counts = {"tokens": tokens, "computed": batch["input_ids"].numel()}
        return batch, counts, self.data.attention(self.model)

    def _train_step(self, rate: float, floor: bool, index: int) -> tuple[float, dict]:
        device_type = torch.device(self.case.device).type
        autocast = torch.autocast(device_type, self.autocast) if self.autocast else contextlib.nullcontext()
        chunked = self.config.chunked_loss
        batch, counts, attention = self._batch(index)
        with self._pattern(rate, floor, index), autocast, attention:
            loss = chunked_causal_lm_loss(self.model, batch) if chunked else self.model(**batch).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (self.controller.dropped_fraction() if self.controller else 0.0), counts

    def step(self, rate: float = 0.0, floor: bool = False, index: int = 0) -> dict:
        """One timed training step (forward, backward, optimizer step) with step ``index``'s drop pattern and batch,
        and the loss train's ``chunked_loss`` says (``leanft.core.chunked_loss``: never the full logits); with its
        examples' own tokens and the tokens it computed (padding included)."""
        _sync(self.case.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        dropped, counts = self._train_step(rate, floor, index)
        _sync(self.case.device)
        cpu_seconds = time.process_time() - cpu_start  # all threads; with one thread, robust to a busy machine
        return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds, "dropped": dropped, "index": index,
                **counts}

    def least_dropped(self, rate: float, indices: list[int]) -> int:
        """Among the steps ``indices``, the one whose pattern at ``rate`` drops the smallest share of FLOPs."""
        if self.controller is None or not rate:
            return indices[0]
        self.controller.set_rates([rate] * len(self.controller.branches))
        return min(indices, key=lambda i: (self.controller.dropped_fraction(self.controller.sample(i)), i))

    def init_optimizer_state(self) -> None:
        """Allocate the optimizer's state (one step on zero gradients) so a measured step sees steady-state memory."""
        for param in self.params:
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self, rate: float = 0.0, floor: bool = False, indices: list[int] | None = None) -> dict:
        """Peak memory and bytes saved for backward of one step; DropBP uses the least-dropped of ``indices``."""
        device = self.case.device
        index = self.least_dropped(rate, indices or [0])
        self.init_optimizer_state()
        _sync(device)
        setup = current_bytes(device)
        reset_peak(device)
        with SavedTensorMeter(self.model) as meter:
            dropped, _ = self._train_step(rate, floor, index)
        _sync(device)
        return {"peak": peak_bytes(device), "setup": setup, "saved": meter.bytes, "dropped": dropped, "index": index,
                "optimizer_state": state_bytes(self.optimizer)}


def _quiet() -> None:
    """Keep workers from printing load bars and deprecation warnings over the parent's progress lines."""
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def serve(case: Case, conn) -> None:
    """Worker entry point: build a ``Trainee`` for ``case`` and answer ``{"op", "args"}`` requests until "exit".

    The first reply reports memory in use before (``start``) and after (``loaded``) building the model.
    Every reply is a dict; a failure is ``{"error": traceback}``, a CUDA out-of-memory ``{"oom": message}``.
    """
    _quiet()
    try:
        settings = case
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.release_memory and not settings.device.startswith("cuda"):
            release_freed_memory()
        start = current_bytes(settings.device)
        trainee = Trainee(settings)
        conn.send({"start": start, "loaded": current_bytes(settings.device), "threads": torch.get_num_threads()})
        while True:
            request = conn.recv()
            if request["op"] == "exit":
                break
            try:
                conn.send(getattr(trainee, request["op"])(**request.get("args", {})))
            except torch.OutOfMemoryError as error:
                conn.send({"oom": str(error).splitlines()[0]})
    except torch.OutOfMemoryError as error:
        conn.send({"oom": str(error).splitlines()[0]})
    except Exception:  # reported to the parent, which shows it next to the method's name
        conn.send({"error": traceback.format_exc(limit=8)})
    finally:
        conn.close()
