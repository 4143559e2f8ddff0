"""Real text that ships with every Python: the training, validation and calibration corpus of the
project's own small MoE, in two clearly different domains.

* code:  the standard library's Python source (test packages and site-packages excluded), with its
         docstrings cut out;
* prose: English documentation: the `pydoc_data` topics (one document per topic) and the
         docstrings of the same standard-library files (one document per file).

Splits are by document and fixed by a hash of the document's name (not by its position in a list),
so that adding or removing a file on another Python version never moves the others between splits.
Every document's sha256 is recorded, so that a run can say whether it saw the same text.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import sysconfig
from pathlib import Path

DOMAINS = ("prose", "code")
SPLITS = ("train", "validation", "calibration")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    name: str        # e.g. "code:json/decoder.py", "prose:topic:specialnames"
    domain: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.name)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def split_of(name: str) -> str:
    """validation 1/16, calibration 1/16, train the rest; a pure function of the name."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 16
    return "validation" if bucket == 0 else "calibration" if bucket == 1 else "train"


def stdlib_sources() -> list[tuple[str, Path]]:
    """(relative name, path) of the standard library's .py files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            out.append((rel.as_posix(), p))
    return sorted(out)


def _split_docstrings(source: str) -> tuple[str, list[str]]:
    """(source without its docstrings, the docstrings). Files that do not parse stay whole."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source, []
    lines = source.splitlines(keepends=True)
    drop, docs = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docs.append((first.lineno, ast.get_docstring(node) or ""))
                # A docstring alone in a body leaves `pass` so that the code still parses.
                keep_pass = len(node.body) == 1
                for ln in range(first.lineno, first.end_lineno + 1):
                    drop.add(ln)
                if keep_pass:
                    line = lines[first.lineno - 1]
                    lines[first.lineno - 1] = line[: len(line) - len(line.lstrip())] + "pass\n"
                    drop.discard(first.lineno)
    code = "".join(line for i, line in enumerate(lines, 1) if i not in drop)
    return code, [d for _, d in sorted(docs) if d.strip()]


@functools.lru_cache(maxsize=4)
def documents(limit: int | None = None) -> tuple[Document, ...]:
    """Every document of both domains, in a deterministic order (cached: parsing the standard
    library takes seconds). limit: at most this many source files (for quick runs and tests)."""
    import pydoc_data.topics
    docs = [Document(f"prose:topic:{k}", "prose", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    for rel, path in stdlib_sources()[:limit]:
        code, strings = _split_docstrings(path.read_text(encoding="utf-8", errors="replace"))
        docs.append(Document(f"code:{rel}", "code", code))
        if strings:
            docs.append(Document(f"prose:doc:{rel}", "prose", "\n\n".join(strings)))
    return tuple(docs)


def select(docs, domain: str, split: str) -> list[Document]:
    return [d for d in docs if d.domain == domain and d.split == split]


def manifest(docs) -> dict:
    """What a run saw: per document its split and sha256, plus one digest over all of them."""
    entries = {d.name: {"split": d.split, "sha256": d.sha256, "chars": len(d.text)} for d in docs}
    digest = hashlib.sha256("".join(f"{n}{e['sha256']}" for n, e in entries.items()).encode()).hexdigest()
    return {"digest": digest, "documents": entries}
