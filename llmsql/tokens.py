"""A prompt's tokens as a local backend sends them, counted without torch or transformers.

The ``transformers`` and ``vllm`` backends wrap every prompt in the model's chat template (one
user message plus the generation prompt), render it to text and tokenize that text without
adding special tokens; without a template (or with vLLM's ``chat_template=False``) they
tokenize the prompt as written, with the tokenizer's special tokens. The number they report
as a response's ``prompt_tokens``, and ANALYZE sums, is the length of that. EXPLAIN counts
the same thing here with the light ``tokenizers`` library and ``jinja2``, rendering the
template the way transformers' ``apply_chat_template`` does (a sandboxed environment with
``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``, ``raise_exception`` and
``strftime_now``, and the tokenizer's special tokens as variables). On the embedded
SmolLM2 the template adds 30 tokens to every prompt (a system message included), more than
a short prompt's own.

>>> t = PromptTokenizer.load(None)  # the embedded model, when it is on disk
>>> t is None or t.count("Hi") == t.overhead + 1
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from llmsql.models import local_model_folder

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
"""The tokenizer's special tokens a chat template may use (transformers passes these)."""


@dataclass(frozen=True, slots=True)
class PromptTokenizer:
    """Counts a prompt's tokens as the backend sends it (chat template included).

    Attributes:
        tokenizer: the model's ``tokenizers.Tokenizer``.
        template: renders a prompt as the chat template's text, or None when the prompt is
            sent as written.
    """

    tokenizer: Any
    template: Callable[[str], str] | None

    @staticmethod
    def load(model: str | None, /, *, chat_template: bool = True) -> PromptTokenizer | None:
        """The counter for a local model folder (None: the embedded model), if its tokenizer
        is on disk already (never converts or downloads) and ``tokenizers`` is installed.

        Args:
            model: the session's model name or folder.
            chat_template: whether the backend applies the model's chat template.
        """
        folder = local_model_folder(model)
        if folder is None or not (folder / "tokenizer.json").is_file():
            return None
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return None
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return PromptTokenizer(tok, _chat_template(folder) if chat_template else None)

    def count(self, prompt: str, /) -> int:
        """Tokens of ``prompt`` as sent: inside the chat template, else with special tokens."""
        if self.template is None:
            return len(self.tokenizer.encode(prompt).ids)
        return len(self.tokenizer.encode(self.template(prompt), add_special_tokens=False).ids)

    def text_ids(self, text: str, /) -> list[int]:
        """Token ids of a bare text (an answer), without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def overhead(self) -> int:
        """Tokens every prompt gets on top of its own (the template's, or special tokens)."""
        return self.count("")


def _chat_template(folder: pathlib.Path) -> Callable[[str], str] | None:
    """The folder's chat template as a function of the user message, or None without one
    (or without ``jinja2``).
    """
    config = _read_json(folder / "tokenizer_config.json")
    source = _template_source(folder, config)
    if source is None:
        return None
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(source)
    special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS if config.get(k)}

    def render(prompt: str) -> str:
        return compiled.render(messages=[{"role": "user", "content": prompt}], tools=None,
                               documents=None, add_generation_prompt=True, **special)

    return render


def _template_source(folder: pathlib.Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja``, else the config's ``chat_template`` (its ``default`` entry
    when it holds several named templates).
    """
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) else None


def _token_text(value: Any) -> str:
    """A special token as text (older configs store ``{"content": ...}``)."""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
