"""GGUF export: round trips through transformers' GGUF loader, tokenizer metadata, refusals, the Ollama Modelfile."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, tiny_model
from tokenizers import Regex, pre_tokenizers, processors

from leanft.core.errors import LeanftError
from leanft.run.gguf_export import GGUF_TYPES, check_gguf_export, copy_metadata, save_gguf, source_gguf_for
from leanft.run.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from leanft.run.models import embedded_gguf_path
from leanft.run.ollama import CHATML, LLAMA3, modelfile_text, template_family

MIXED = 'Hello, World! Café naïve 東京 😀 — 12345 + 6.78 = 12351.78; it\'s "quoted"\n\ttabs  and   spaces ###'
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Convert 14 March 2021 to YYYY-MM-DD."},
    {"role": "assistant", "content": "2021-03-14"},
    {"role": "user", "content": "Und 3. Mai 1999? ¿Sí?"},
]
PRE_SPLITS = {"llama": None, "qwen2": QWEN2_SPLIT, "qwen3": LLAMA3_SPLIT}  # one pre-tokenizer name each
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": partial(transformers.Qwen3Config, head_dim=128),  # transformers' GGUF loader assumes Qwen3's 128
}


def tokenizer_for(arch: str, chat_template: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """The tiny ChatML tokenizer, with the split pre-tokenizer this test pairs with ``arch``."""
    tokenizer = make_tiny_tokenizer() if chat_template is None else make_tiny_tokenizer(chat_template)
    split = PRE_SPLITS[arch]
    if split is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    return tokenizer


def tiny_for(arch: str, tokenizer, tie: bool = False, extra_vocab: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model of ``arch`` whose every weight, norm and bias is perturbed (so a misplaced one shows)."""
    torch.manual_seed(0)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    config = CONFIGS[arch](
        vocab_size=len(tokenizer) + extra_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, **ids,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def load_gguf(path: Path) -> transformers.PreTrainedModel:
    """The model transformers' GGUF loader rebuilds from ``path``, dequantized to float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True),
    ).eval()  # fmt: skip


def load_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rounded(model, round_matrix) -> transformers.PreTrainedModel:
    """A copy of ``model`` with every matrix passed through ``round_matrix`` (what the file stores of it)."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            if parameter.dim() == 2:
                parameter.copy_(round_matrix(parameter))
    return copied


def through(qtype):
    """Round a matrix the way ``gguf`` quantizes it to ``qtype`` and back."""
    return lambda w: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def sample_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def tensor_types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (model, tokenizer, f16 file) for Llama (tied, padded vocabulary), Qwen2 and Qwen3."""
    made = {}
    for arch in CONFIGS:
        tokenizer = tokenizer_for(arch)
        model = tiny_for(arch, tokenizer, tie=arch == "llama", extra_vocab=5 if arch == "llama" else 0)
        path, _ = save_gguf(model, tokenizer, tmp_path_factory.mktemp(arch) / f"{arch}.gguf", "f16")
        made[arch] = (model, tokenizer, path)
    return made


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_f16_file_gives_the_models_logits(exported, arch):
    model, _, path = exported[arch]
    back = load_gguf(path)
    assert type(back) is type(model)
    tokens = sample_tokens(model.config.vocab_size)
    expected = logits(rounded(model, lambda w: w.half().float()), tokens)
    torch.testing.assert_close(logits(back, tokens), expected, rtol=1e-4, atol=1e-4)  # exact but for f16 storage
    torch.testing.assert_close(logits(back, tokens), logits(model, tokens), rtol=0, atol=2e-3)
    names = tensor_types(path)
    assert ("output.weight" in names) == (arch != "llama")  # the tied Llama stays tied
    assert names["blk.0.attn_q.weight"] == "F16" and names["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_tokenizer_round_trips(exported, arch):
    _, tokenizer, path = exported[arch]
    back = load_gguf_tokenizer(path)
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in (MIXED, chat, " leading space", "2021-03-14T09:30"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == ids, text
        assert back.decode(ids) == tokenizer.decode(ids)
    assert tokenizer("x")["input_ids"] == back("x")["input_ids"]  # the same special tokens added (none)
    assert back.chat_template == tokenizer.chat_template
    assert (back.eos_token, back.bos_token, back.pad_token) == (tokenizer.eos_token, tokenizer.bos_token, "<pad>")
    expected_pre = {"llama": "gpt2", "qwen2": "qwen2", "qwen3": "llama-bpe"}[arch]
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == expected_pre


def test_q8_0_is_close_and_answers_the_same(exported, tmp_path):
    model, tokenizer, _ = exported["qwen2"]
    path, _ = save_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    assert set(tensor_types(path).values()) == {"Q8_0", "F32"}
    back = load_gguf(path)
    tokens = sample_tokens(model.config.vocab_size)
    reference = rounded(model, through(gguf.GGMLQuantizationType.Q8_0))
    torch.testing.assert_close(logits(back, tokens), logits(reference, tokens), rtol=1e-4, atol=1e-4)
    plain = logits(model, tokens)
    torch.testing.assert_close(logits(back, tokens), plain, rtol=0, atol=0.1 * plain.std().item())  # ~8-bit noise
    for prompt in ("What is the capital of France?", "Rewrite the date", "user assistant system"):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(back.generate(ids, **greedy), model.generate(ids, **greedy)), prompt


def test_bf16_round_trips_exactly(exported, tmp_path):
    model, tokenizer, _ = exported["qwen3"]
    path, _ = save_gguf(model, tokenizer, tmp_path / "bf16.gguf", "bf16")
    back, reference = load_gguf(path).state_dict(), rounded(model, lambda w: w.bfloat16().float()).state_dict()
    assert set(back) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(back[name], tensor), name


def test_q4_0_stores_blocks_and_keeps_the_embeddings_at_q8_0(exported, tmp_path):
    model, tokenizer, _ = exported["qwen2"]
    path, _ = save_gguf(model, tokenizer, tmp_path / "q4.gguf", "q4_0")
    types = tensor_types(path)
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    back, tokens = load_gguf(path), sample_tokens(model.config.vocab_size)
    kinds = gguf.GGMLQuantizationType
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if parameter.dim() == 2:
                q8 = name in ("model.embed_tokens.weight", "lm_head.weight")
                parameter.copy_(through(kinds.Q8_0 if q8 else kinds.Q4_0)(parameter))
    torch.testing.assert_close(logits(back, tokens), logits(reference, tokens), rtol=1e-4, atol=1e-4)


def test_rows_that_do_not_fill_blocks_fall_back_to_f16(tmp_path):
    tokenizer = tokenizer_for("llama")
    model = tiny_model("llama")  # intermediate 48: ffn_down rows are not a whole number of 32-value blocks
    model.resize_token_embeddings(len(tokenizer))
    path, _ = save_gguf(model, tokenizer, tmp_path / "odd.gguf", "q8_0")
    types = tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def decorated_source(plain: Path, target: Path, head_dim: int) -> None:
    """``plain``'s metadata and tensors plus keys and a tensor a published GGUF carries (like ``rope_freqs``)."""
    reader = gguf.GGUFReader(plain)
    writer = gguf.GGUFWriter(target, "llama")
    copy_metadata(writer, reader)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_string("general.license", "apache-2.0")
    writer.add_string("general.name", "Tiny Source 1M")
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_base_keeps_the_sources_metadata_and_layout(tmp_path):
    tokenizer = tokenizer_for("llama")
    plain, _ = save_gguf(tiny_for("llama", tokenizer, tie=True), tokenizer, tmp_path / "plain" / "p.gguf", "q8_0")
    source = tmp_path / "source" / "tiny.Q8_0.gguf"
    source.parent.mkdir()
    decorated_source(plain, source, head_dim=16)
    base, base_tokenizer = load_gguf(source), load_gguf_tokenizer(source)  # as leanft loads a GGUF base
    with torch.no_grad():  # stands in for fine-tuning
        for parameter in base.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    path, _ = save_gguf(base, base_tokenizer, tmp_path / "out" / "tuned.gguf", "f16", source_gguf=source)

    before, after = gguf.GGUFReader(source), gguf.GGUFReader(path)
    values = {name: field.contents() for name, field in after.fields.items()}
    for name, field in before.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert values[name] == field.contents(), name
    assert values["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]  # same order, still no output
    copied = {t.name: t for t in after.tensors}["rope_freqs.weight"]
    assert np.array_equal(copied.data, np.ones(8, dtype=np.float32))
    tokens = sample_tokens(base.config.vocab_size)
    expected = logits(rounded(base, lambda w: w.half().float()), tokens)
    torch.testing.assert_close(logits(load_gguf(path), tokens), expected, rtol=1e-4, atol=1e-4)


def test_a_source_of_another_model_is_refused(exported, tmp_path):
    _, tokenizer, llama_file = exported["llama"]
    other = tiny_for("llama", tokenizer)  # no padded vocabulary: one size differs
    with pytest.raises(LeanftError, match="not this model's base .*vocabulary") as error:
        save_gguf(other, tokenizer, tmp_path / "x.gguf", "f16", source_gguf=llama_file)
    assert "\n" not in str(error.value) and not list(tmp_path.iterdir())


def test_check_refuses_a_bad_type_in_one_line():
    with pytest.raises(LeanftError) as error:
        check_gguf_export({"model_type": "llama"}, "q5_k")
    assert str(error.value).count("\n") == 0 and ", ".join(GGUF_TYPES) in str(error.value)
    for gguf_type in GGUF_TYPES:
        check_gguf_export({"model_type": "qwen3"}, gguf_type)


def test_check_refuses_other_architectures_and_rope_scaling():
    with pytest.raises(LeanftError, match=r"llama, qwen2, qwen3 architectures, not 'gpt2'") as error:
        check_gguf_export({"model_type": "gpt2"}, "f16")
    assert "\n" not in str(error.value)
    with pytest.raises(LeanftError, match="rotary scaling default or linear, not 'yarn'"):
        check_gguf_export({"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "f16")
    check_gguf_export({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, "f16")


def test_the_checks_need_neither_torch_nor_gguf():
    code = (
        "import sys; from leanft.run.gguf_export import check_gguf_export, GGUF_TYPES\n"
        "try:\n    check_gguf_export({'model_type': 'llama'}, 'q2_k')\nexcept ValueError as e:\n    print(e)\n"
        "print([m for m in ('torch', 'gguf', 'transformers', 'numpy') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]" and "use type= one of" in done.stdout


def test_source_gguf_for_a_run_spec(tmp_path):
    assert source_gguf_for("default") == source_gguf_for(None) == embedded_gguf_path()
    assert source_gguf_for(str(tmp_path / "base.Q4_K_M.gguf")) == tmp_path / "base.Q4_K_M.gguf"
    assert source_gguf_for(str(tmp_path)) is None and source_gguf_for("Qwen/Qwen2.5-0.5B") is None


def test_refusals_write_nothing(tmp_path):
    tokenizer = tokenizer_for("llama")
    with pytest.raises(LeanftError, match="architectures"):
        save_gguf(tiny_model("gpt2"), tokenizer, tmp_path / "out" / "gpt2.gguf", "f16")
    metaspace = make_tiny_tokenizer()
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(LeanftError, match="pre-tokenizer"):
        save_gguf(tiny_for("llama", metaspace), metaspace, tmp_path / "gguf.gguf", "f16")
    assert not list(tmp_path.rglob("*"))


def expand(go_template: str, messages: list[dict[str, str]]) -> str:
    """What Ollama renders from the one Go-template shape this module writes (a range over messages)."""
    body, tail = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}(.*)", go_template, re.S).groups()
    fill = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return "".join(fill) + tail


def test_modelfile_for_chatml_has_the_template_and_stops(exported):
    _, tokenizer, path = exported["qwen2"]
    text = (path.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{path.name}\n")
    assert f'TEMPLATE """{CHATML.go_template}"""' in text and "SYSTEM" not in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert expand(CHATML.go_template, CHAT) == rendered


def test_modelfile_keeps_a_default_system_prompt_and_the_eos_stop():
    template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = make_tiny_tokenizer(template)
    tokenizer.eos_token = "<pad>"  # an EOS that is not the end-of-turn token gets its own stop
    text = modelfile_text("m.gguf", tokenizer)
    assert 'SYSTEM """You are a helpful assistant."""' in text
    assert text.count("PARAMETER stop") == 3 and 'PARAMETER stop "<pad>"' in text


def test_modelfile_recognises_llama3_and_leaves_others_without_template():
    llama3 = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    tokenizer = make_tiny_tokenizer(llama3)
    assert template_family(tokenizer) is None  # its BOS would be missing: encoding does not add one
    bos = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", special_tokens=[bos]
    )
    assert template_family(tokenizer) is LLAMA3
    assert expand(LLAMA3.go_template, CHAT) == LLAMA3.render(CHAT)
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}### assistant:\n"
    for template in (alpaca, None):
        tokenizer = make_tiny_tokenizer(template)
        text = modelfile_text("m.gguf", tokenizer)
        assert "\nTEMPLATE" not in text and "not recognised" in text
        assert text.strip().endswith('PARAMETER stop "<|im_end|>"')


@pytest.mark.slow
def test_default_model_round_trips_through_f16(tmp_path):
    from leanft.run.evaluate import generate_answers
    from leanft.run.models import default_model_path

    folder = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    path, modelfile = save_gguf(model, tokenizer, tmp_path / "smollm2.gguf", "f16", embedded_gguf_path())
    back, back_tokenizer = load_gguf(path), load_gguf_tokenizer(path)
    tokens = sample_tokens(model.config.vocab_size)
    expected = logits(rounded(model, lambda w: w.half().float()), tokens)
    torch.testing.assert_close(logits(back, tokens), expected, rtol=1e-3, atol=1e-3)
    prompts = ["What is the capital of France?", "Convert the date to YYYY-MM-DD: 3 May 2001", "Name a colour."]
    assert generate_answers(back, back_tokenizer, prompts) == generate_answers(model, tokenizer, prompts)
    assert "output.weight" not in tensor_types(path)
    assert 'PARAMETER stop "<|im_end|>"' in modelfile.read_text() and "SYSTEM" in modelfile.read_text()


@pytest.mark.slow
def test_default_model_as_a_hugging_face_folder_keeps_its_tokenizer(tmp_path):
    from leanft.run.models import default_model_path

    folder = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    path, modelfile = save_gguf(model, tokenizer, tmp_path / "hf.gguf", "q8_0")  # no source: from the folder
    back = load_gguf_tokenizer(path)
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in (MIXED, chat):
        assert (
            back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    assert back.chat_template == tokenizer.chat_template and "SYSTEM" in modelfile.read_text()
    fields = gguf.GGUFReader(path).fields
    assert (
        fields["llama.rope.freq_base"].contents() == 100000.0
        and fields["llama.attention.head_count_kv"].contents() == 3
    )
