"""Text <-> token ids through the `tokenizers` library (tokenizer.json beside the checkpoint), and
the checkpoint's chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja),
rendered as transformers renders it (a sandboxed jinja2 environment, trim_blocks, lstrip_blocks)."""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import GenerationError


class TextCodec:
    def __init__(self, path: Path):
        self.path = Path(path)
        f = self.path / "tokenizer.json"
        if f.exists():
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_file(str(f))
        else:
            self.tokenizer = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens: what the tokenizer's post-processor adds (e.g. a BOS token)."""
        if self.tokenizer is None:
            raise GenerationError(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise GenerationError(f"{self.path} has no tokenizer.json")
        return self.tokenizer.decode(list(ids))

    def prompts(self, prompts) -> list[list[int]]:
        """A string, a list of strings, one token-id list, or a list of token-id lists -> id lists."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        return [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]

    def texts(self, tokens: list[list[int]]) -> list[str] | None:
        return [self.decode(t) for t in tokens] if self.tokenizer is not None else None

    @functools.cached_property
    def _tokenizer_config(self) -> dict:
        f = self.path / "tokenizer_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    @functools.cached_property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (a jinja2 source), or None when it has none."""
        f = self.path / "chat_template.jinja"
        template = f.read_text() if f.is_file() else self._tokenizer_config.get("chat_template")
        if isinstance(template, list):           # named templates: the "default" one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template or None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **options) -> str:
        """messages ([{"role": ..., "content": ...}]) through the chat template -> the prompt text.
        options: the template's own switches (e.g. enable_thinking for Qwen3)."""
        if self.chat_template is None:
            raise GenerationError(f"{self.path} has no chat template (tokenizer_config.json chat_template or "
                                  f"chat_template.jinja)")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in self._tokenizer_config.items()
                   if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special, **options)
        except TemplateError as e:
            raise GenerationError(f"{self.path}: the chat template failed: {e}") from None
