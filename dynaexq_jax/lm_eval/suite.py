"""The local task suite's data: items built from the validation split of the standard-library
corpus (experiments.corpus; the default model never trained on it), written as JSONL beside the
task YAMLs (tasks/data) and shipped, so the suite needs no download and reads the same items on
every machine. Rebuild with `python -m dynaexq_jax.lm_eval.suite` (deterministic for one Python
version's standard library; every item names its source document).

Tasks (tasks/*.yaml):
* dynaexq_{prose,code}_choice (multiple_choice): which of four spans continues the context: the
  true one, or a span of about its length from elsewhere in the same document (another held-out
  document of the domain when it is short);
* dynaexq_code_line (generate_until): the rest of a line of code, cut at a word boundary;
* dynaexq_prose_word (generate_until): the next word of a prose passage;
* dynaexq_{prose,code}_ppl (loglikelihood_rolling): word/byte perplexity of held-out documents.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dynaexq_jax.experiments import corpus

DATA_DIR = Path(__file__).parent / "tasks" / "data"
CONTEXT_CHARS = 320      # context before the cut (choice and word tasks), started at a word
SPAN_CHARS = 48          # the continuation of a choice item: this long, then to the next word end
CHOICES = 4


def _boundaries(text: str) -> np.ndarray:
    """Positions p where a word ends: text[p - 1] is not whitespace and text[p] is."""
    return np.asarray([m.start() for m in re.finditer(r"(?<=\S)\s", text)], np.int64)


def _span(text: str, start: int, bounds: np.ndarray, chars: int) -> str | None:
    """text[start:q] for the first word end q at least `chars` after start (None past the end)."""
    after = bounds[bounds >= start + chars]
    return text[start:int(after[0])] if len(after) else None


def _weighted(rng, docs):
    sizes = np.asarray([len(d.text) for d in docs], np.float64)
    return docs[int(rng.choice(len(docs), p=sizes / sizes.sum()))]


def choice_items(docs, n: int, rng) -> list[dict]:
    docs = [d for d in docs if len(d.text) >= CONTEXT_CHARS + 3 * SPAN_CHARS]
    bounds = {d.name: _boundaries(d.text) for d in docs}
    items, seen = [], set()
    while len(items) < n:
        doc = _weighted(rng, docs)
        b = bounds[doc.name]
        cuts = b[(b >= CONTEXT_CHARS) & (b <= len(doc.text) - 2 * SPAN_CHARS)]
        if not len(cuts):
            continue
        p = int(rng.choice(cuts))
        answer = _span(doc.text, p, b, SPAN_CHARS)
        if answer is None or (doc.name, p) in seen:
            continue
        start = int(b[b >= p - CONTEXT_CHARS][0]) + 1           # the context starts at a word
        choices = [answer]
        for tries in range(50 * CHOICES):
            if len(choices) == CHOICES:
                break
            # Spans of the same document first (same style and topic: the context must decide),
            # away from the context and the answer; another document of the domain otherwise.
            src = doc if tries < 20 else _weighted(rng, docs)
            ob = bounds[src.name]
            far = ob[:-1] if src is not doc else ob[:-1][(ob[:-1] < start - 2 * SPAN_CHARS) |
                                                          (ob[:-1] > p + len(answer) + SPAN_CHARS)]
            if not len(far):
                continue
            span = _span(src.text, int(rng.choice(far)), ob, len(answer) - 8)
            if span is not None and span.strip() and span not in choices and len(span) <= 2 * len(answer):
                choices.append(span)
        if len(choices) < CHOICES:
            continue
        order = rng.permutation(CHOICES)
        seen.add((doc.name, p))
        items.append(dict(source=doc.name, context=doc.text[start:p], choices=[choices[i] for i in order],
                          label=int(np.flatnonzero(order == 0)[0])))
    return items


def code_line_items(docs, n: int, rng) -> list[dict]:
    """Context: up to 12 lines and the start of a line; target: the rest of that line."""
    items, seen = [], set()
    candidates = []
    for d in docs:
        lines = d.text.split("\n")
        for i in range(6, len(lines)):
            if len(lines[i].strip()) >= 12:
                candidates.append((d, lines, i))
    while len(items) < n:
        d, lines, i = candidates[int(rng.integers(len(candidates)))]
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        cuts = [m.end() for m in re.finditer(r"\w\b", line) if indent + 4 <= m.end() <= len(line) - 4]
        if not cuts or (d.name, i) in seen:
            continue
        c = int(rng.choice(cuts))
        seen.add((d.name, i))
        context = "\n".join(lines[max(0, i - 12):i]) + "\n" + line[:c]
        items.append(dict(source=d.name, context=context, target=line[c:]))
    return items


def prose_word_items(docs, n: int, rng) -> list[dict]:
    """Context: ~CONTEXT_CHARS of prose ending at a word end; target: the next word."""
    docs = [d for d in docs if len(d.text) >= 2 * CONTEXT_CHARS]
    items, seen = [], set()
    while len(items) < n:
        doc = _weighted(rng, docs)
        m = list(re.finditer(r"(?<=\S) ([A-Za-z]{2,})(?=[\s.,;:])", doc.text[CONTEXT_CHARS:]))
        if not m:
            continue
        hit = m[int(rng.integers(len(m)))]
        p = CONTEXT_CHARS + hit.start()
        if (doc.name, p) in seen:
            continue
        seen.add((doc.name, p))
        start = doc.text.find(" ", p - CONTEXT_CHARS) + 1
        items.append(dict(source=doc.name, context=doc.text[start:p], target=hit.group(1)))
    return items


def ppl_items(docs, n: int, max_chars: int = 2000) -> list[dict]:
    """Whole documents (the longest first), each cut at a line end within max_chars."""
    out = []
    for d in sorted(docs, key=lambda d: (-len(d.text), d.name))[:n]:
        text = d.text[:max_chars]
        if len(d.text) > max_chars and "\n" in text:
            text = text[:text.rindex("\n")]
        out.append(dict(source=d.name, text=text))
    return out


def build(out_dir: Path = DATA_DIR, seed: int = 0, choice: int = 400, generation: int = 300,
          documents: int = 40) -> dict[str, int]:
    """Write every task's JSONL into out_dir; returns items per file."""
    docs = corpus.documents()
    val = {d: corpus.select(docs, d, "validation") for d in corpus.DOMAINS}
    rng = np.random.default_rng(seed)
    files = {"prose_choice": choice_items(val["prose"], choice, rng),
             "code_choice": choice_items(val["code"], choice, rng),
             "code_line": code_line_items(val["code"], generation, rng),
             "prose_word": prose_word_items(val["prose"], generation, rng),
             "prose_ppl": ppl_items(val["prose"], documents),
             "code_ppl": ppl_items(val["code"], documents)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return {name: len(items) for name, items in files.items()}


if __name__ == "__main__":
    for name, n in build().items():
        print(f"{DATA_DIR / name}.jsonl: {n} items")
