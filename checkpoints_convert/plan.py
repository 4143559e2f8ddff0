"""The conversion plan, made from the model family's schema (model/families/schema.py) and
checked against the checkpoint's headers before any tensor data is read.

A plan is a list of groups written one at a time (the dense group, then one group per layer).
Each Entry says which HF tensors (with their expected shapes) make one parameter of ours and how
(the schema's transform: transpose to input-major, stack experts, split a fused tensor). Its
build function pulls the tensors itself through a reader, so that it can drop each one as soon
as it is used. A group's optional `experts` entry builds the float expert stacks of a range of
experts (the converter quantizes a few experts at a time into both tiers, on every core).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.layers import HF_LM_HEAD
from dynaexq_jax.serving.checkpoint import DENSE_DIR, layer_dir

Reader = Callable[[str], np.ndarray]     # HF tensor name -> its data (read on demand)


@dataclasses.dataclass(frozen=True)
class Entry:
    target: str                           # dotted path in the group's tree, e.g. "attn.q"
    sources: tuple[str, ...]              # the HF tensors build may read (and must all be present)
    shapes: tuple[tuple[int, ...], ...]   # the expected HF shape of each source
    build: Callable[..., object]          # read -> our array; experts: (read, range) -> stacks of that range
    spec: schema.Experts | None = None    # experts only: the layer's E, H, I
    dtypes: tuple[str | None, ...] = ()   # per source: its required safetensors dtype, None (or absent): a float


@dataclasses.dataclass(frozen=True)
class Group:
    name: str                             # output sub-directory: "dense" or "layers/007"
    entries: tuple[Entry, ...]
    layer: int | None = None
    experts: Entry | None = None          # -> {"gate": [e,H,I], "up": [e,H,I], "down": [e,I,H]} of e experts

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


def build_plan(cfg: ModelConfig, names: Collection[str]) -> Plan:
    """The plan for a checkpoint of family cfg.model_type holding tensors `names`: every schema
    leaf of the abstract tree, the routed experts in whichever HF layout each layer uses, and the
    tensors the family drops on purpose (its SKIPPED rules, and the tied head's copy)."""
    fam = family(cfg.model_type)
    names = set(names)
    skipped = [(n, reason) for rule, reason in fam.SKIPPED for n in sorted(names) if rule.fullmatch(n)]
    if cfg.tie_word_embeddings and HF_LM_HEAD in names:
        skipped.append((HF_LM_HEAD, "tie_word_embeddings=true: the output head is the embedding"))
    src = _renamed(fam, names)            # schema name -> the checkpoint's name for it, where they differ
    names = (names - set(src.values())) | set(src)
    entries: dict[int | None, list[Entry]] = {None: [], **{i: [] for i in range(cfg.num_layers)}}
    experts: dict[int, Entry] = {}
    layouts = set()
    for layer, key, spec in schema.leaves(fam.abstract(cfg)):
        if isinstance(spec, schema.Experts):
            layout = spec.layout(names)
            layouts.add(layout)
            shapes, dtypes = spec.hf_shapes(layout), spec.hf_dtypes(layout)
            experts[layer] = Entry("experts", tuple(src.get(n, n) for n in shapes), tuple(shapes.values()),
                                   lambda read, rng, spec=spec, layout=layout: spec.from_hf(
                                       layout, lambda hf: read(src.get(hf, hf)), rng), spec,
                                   tuple(dtypes.get(n) for n in shapes))
        else:
            name = src.get(spec.hf_name, spec.hf_name)
            entries[layer].append(Entry(key, (name,), (spec.hf_shape,),
                                        lambda read, spec=spec, name=name: spec.from_hf(read(name))))
    groups = [Group(DENSE_DIR, tuple(entries.pop(None)))]
    groups += [Group(layer_dir(i), tuple(e), layer=i, experts=experts.get(i)) for i, e in entries.items()]
    info = {"expert_layout": layouts.pop() if len(layouts) == 1 else ("mixed" if layouts else "none")}
    return Plan(tuple(groups), tuple(skipped), info)


def _renamed(fam, names: set[str]) -> dict[str, str]:
    """A family's HF_RENAMES ((regex, replacement), ...: other spellings of its tensor names, e.g.
    transformers 5's in-memory ones) applied to a checkpoint's names: {schema name: checkpoint name}."""
    out = {}
    for n in names:
        for rule, replacement in getattr(fam, "HF_RENAMES", ()):
            if rule.fullmatch(n):
                out[rule.sub(replacement, n)] = n
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
