"""Text <-> token ids through the `tokenizers` library (tokenizer.json beside the checkpoint)."""
from __future__ import annotations

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
