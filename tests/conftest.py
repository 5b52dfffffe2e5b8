"""Shared fixtures: tiny random causal LMs of several architectures (CPU, seconds)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **COMMON)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **DECODER),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **DECODER),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **DECODER),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **DECODER),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **DECODER),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, **DECODER),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**DECODER),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, **COMMON
    ),
}
ARCHITECTURES = list(TINY_CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random causal LM of ``arch`` in fp32, dropout off, in train mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.train()


def tiny_batch(batch: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with labels (the first 3 labels of each row masked, as a prompt would be)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """A small training batch for tiny models."""
    return tiny_batch()


# --------------------------------------------------------------------------- tiny offline tokenizers (data tests)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_TEXTS = [
    "What is the capital of France? Paris.",
    "Rewrite the date 14 March 2021 as 2021-03-14.",
    "### Instruction:\n### Response:\nuser assistant system",
]


def make_tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few strings (no download) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_TEXTS, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama_for(tokenizer, hidden_size: int = 32, intermediate_size: int = 48) -> transformers.LlamaForCausalLM:
    """A tiny random Llama (seed 0) sized for ``tokenizer``'s vocabulary, with its pad / eos / bos ids."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def save_tiny_llama(folder, hidden_size: int = 32, intermediate_size: int = 48) -> None:
    """Save a tiny random Llama with the tiny chat tokenizer (``make_tiny_tokenizer``) as a local HF folder."""
    tokenizer = make_tiny_tokenizer()
    tiny_llama_for(tokenizer, hidden_size, intermediate_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Tiny offline tokenizer with a ChatML chat template."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_plain_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Tiny offline tokenizer without a chat template (exercises the plain-text fallback)."""
    return make_tiny_tokenizer(chat_template=None)


@pytest.fixture
def one_thread():
    """One intra-op thread: bitsandbytes' CPU kernels and tiny matmuls are slow in parallel regions."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny_model")
    save_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """40 instruction records in JSONL."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [json.dumps({"instruction": f"Add one to {i}.", "output": str(i + 1)}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def full_weight_grad(module: torch.nn.Module) -> torch.Tensor:
    """Weight gradient as (out x in), whatever the layout (GPT-2 Conv1D stores in x out)."""
    grad = module.weight.grad
    return grad.t() if type(module).__name__ == "Conv1D" else grad


def assert_paca_matches_reference(model: torch.nn.Module, reference: torch.nn.Module) -> dict:
    """Same logits as ``reference`` (exactly), and the same gradients: w.r.t. the input embeddings, and for each
    PaCA layer's ``P`` the reference's full weight gradient at its columns; only ``P`` trains. Returns the layers."""
    import leanft

    batch = tiny_batch()
    embeds = reference.get_input_embeddings()(batch["input_ids"]).detach()
    ref_embeds, paca_embeds = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    inputs = {"attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    ref_out = reference(inputs_embeds=ref_embeds, **inputs)
    paca_out = model(inputs_embeds=paca_embeds, **inputs)
    torch.testing.assert_close(paca_out.logits, ref_out.logits, rtol=0, atol=0)
    ref_out.loss.backward()
    paca_out.loss.backward()

    torch.testing.assert_close(paca_embeds.grad, ref_embeds.grad, rtol=1e-5, atol=1e-7)
    layers = leanft.paca_modules(model)
    assert layers
    for name, layer in layers.items():
        expected = full_weight_grad(reference.get_submodule(name))[:, layer.paca_index]
        torch.testing.assert_close(layer.paca_weight.grad, expected, rtol=1e-5, atol=1e-7)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("paca_weight") for n in trainable)
    return layers
