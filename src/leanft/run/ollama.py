"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, the chat template in Ollama's Go-template form, stops.

The template family is recognised by rendering the tokenizer's Jinja chat template on a sample conversation
and comparing it with what each known family (ChatML, Llama-3) renders: only an exact match gets a
``TEMPLATE``. A default system prompt the Jinja template inserts when a conversation has none becomes a
``SYSTEM`` line. ``PARAMETER stop`` lines name the end-of-turn and EOS tokens (without them a model keeps
generating past its answer). No torch import at module level.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leanft.core.fileio import atomic_path
from leanft.run.gguf_vocab import adds_special_tokens

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class TemplateFamily:
    """A chat format: how it renders a message and the prompt for a reply, its Go template and stop tokens."""

    name: str
    message: Callable[[str, str], str]
    reply: str
    go_template: str
    stops: tuple[str, ...]

    def render(self, messages: Messages) -> str:
        """The conversation followed by the prompt for the assistant's reply."""
        return "".join(self.message(m["role"], m["content"]) for m in messages) + self.reply


CHATML = TemplateFamily(
    name="ChatML",
    message=lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n",
    reply="<|im_start|>assistant\n",
    go_template="{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n",
    stops=("<|im_start|>", "<|im_end|>"),
)
LLAMA3 = TemplateFamily(
    name="Llama-3",
    message=lambda role, content: f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    reply="<|start_header_id|>assistant<|end_header_id|>\n\n",
    go_template="{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
FAMILIES = (CHATML, LLAMA3)
SAMPLE: Messages = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def modelfile_path(gguf_path: str | Path) -> Path:
    """Where the Modelfile for ``gguf_path`` goes: ``Modelfile`` in the same folder."""
    return Path(gguf_path).parent / "Modelfile"


def _render(tokenizer, messages: Messages) -> str | None:
    """The tokenizer's chat template on ``messages`` with the reply prompt; None if it has none or it fails."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # any template error means: not recognised
        return None


def _same(tokenizer, rendered: str | None, expected: str) -> bool:
    """Whether ``rendered`` is ``expected``, or BOS then ``expected`` where encoding adds BOS (llama.cpp does too)."""
    if rendered == expected:
        return True
    bos = tokenizer.bos_token
    return bool(bos) and rendered == bos + expected and adds_special_tokens(tokenizer)[0]


def template_family(tokenizer) -> TemplateFamily | None:
    """The known family whose rendering of a sample conversation equals the tokenizer's, or None."""
    rendered = _render(tokenizer, SAMPLE)
    return next((family for family in FAMILIES if _same(tokenizer, rendered, family.render(SAMPLE))), None)


def default_system(tokenizer, family: TemplateFamily) -> str | None:
    """The system prompt the tokenizer's template inserts into a conversation that has none, or None."""
    user_only = SAMPLE[1:2]
    rendered = _render(tokenizer, user_only)
    head, tail = family.message("system", "\0").split("\0")
    if rendered is None or head not in rendered or _same(tokenizer, rendered, family.render(user_only)):
        return None
    system = rendered.split(head, 1)[1].split(tail)[0]
    with_system = family.render([{"role": "system", "content": system}, *user_only])
    return system if _same(tokenizer, rendered, with_system) else None


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` (in the same folder) of a model with ``tokenizer``."""
    family = template_family(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        lines += [
            "# The chat template was not recognised as ChatML or Llama-3: add a TEMPLATE (Ollama's Go-template",
            "# form of the model's chat template) before using this model for chat.",
        ]
    else:
        lines.append(f'TEMPLATE """{family.go_template}"""')
        system = default_system(tokenizer, family)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    stops = list(family.stops if family else ())
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer, path: str | Path | None = None) -> Path:
    """Write the Ollama Modelfile for ``gguf_path`` atomically (default ``modelfile_path(gguf_path)``); its path."""
    target = Path(path) if path is not None else modelfile_path(gguf_path)
    with atomic_path(target) as temporary:
        temporary.write_text(modelfile_text(Path(gguf_path).name, tokenizer))
    return target
