"""What an architecture map produces: a conversion plan, checked against the checkpoint's headers
before any tensor data is read.

A plan is a list of groups written one at a time (the dense group, then one group per layer).
Each Entry says which HF tensors (with their expected shapes) make one parameter of ours and how
(transpose to input-major, stack experts, split a fused tensor). Its build function pulls the
tensors itself through a reader, so that it can drop each one as soon as it is used (stacking
128 experts need not hold 128 separate arrays and the stack at once). A group's optional
`experts` entry builds the float expert stacks that the converter quantizes into both tiers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Reader = Callable[[str], np.ndarray]     # HF tensor name -> its data (read on demand)


@dataclasses.dataclass(frozen=True)
class Entry:
    target: str                           # dotted path in the group's tree, e.g. "attn.q"
    sources: tuple[str, ...]              # the HF tensors build may read (and must all be present)
    shapes: tuple[tuple[int, ...], ...]   # the expected HF shape of each source
    build: Callable[[Reader], object]     # read -> our array (or, for experts, a dict of stacks)


@dataclasses.dataclass(frozen=True)
class Group:
    name: str                             # output sub-directory: "dense" or "layers/007"
    entries: tuple[Entry, ...]
    layer: int | None = None
    experts: Entry | None = None          # -> {"gate": [E,H,I], "up": [E,H,I], "down": [E,I,H]}

    @property
    def all_entries(self) -> tuple[Entry, ...]:
        return self.entries + ((self.experts,) if self.experts else ())


@dataclasses.dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    skipped: tuple[tuple[str, str], ...]  # (HF name, why it is deliberately not converted)
    info: dict                            # extra facts for the metadata (e.g. the expert layout)

    def used_names(self) -> set[str]:
        return {s for g in self.groups for e in g.all_entries for s in e.sources}


def copy(target: str, name: str, shape: tuple[int, ...]) -> Entry:
    """A tensor taken as it is (norms, biases, embeddings)."""
    return Entry(target, (name,), (shape,), lambda read: read(name))


def linear(target: str, name: str, shape: tuple[int, ...]) -> Entry:
    """An HF nn.Linear weight [out, in], transposed to input-major [in, out]."""
    return Entry(target, (name,), (shape,), lambda read: read(name).T)


def stack(read: Reader, names) -> np.ndarray:
    """Read tensors of one shape into one [len(names), ...] array, one tensor at a time."""
    first = read(names[0])
    out = np.empty((len(names),) + first.shape, first.dtype)
    out[0] = first
    for j, name in enumerate(names[1:], 1):
        out[j] = read(name)
    return out


def nest(flat: dict[str, object]) -> dict:
    """{"attn.q": x, "input_norm": y} -> {"attn": {"q": x}, "input_norm": y}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
