"""A family's parameter tree, described once (in the spirit of jax-llm-examples' Weights.abstract).

Each family's `abstract(cfg)` returns its own Params/Layer dataclasses with spec leaves instead
of arrays: a Tensor per dense parameter (our input-major shape, the HF tensor it comes from, how
it is transformed, how it is randomly initialised) and an Experts per MoE layer (its routed
experts in either HF layout). That one tree drives conversion (names, shapes, transforms),
restore (disk keys, shape checks), init, HF export and random HF checkpoints. A leaf's tree path
is its key on disk: `layers[3].attn.q` is `attn.q` in the converted checkpoint's layers/003.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np

# How an HF tensor becomes ours (to_hf inverts it).
COPY = "copy"        # as it is: norms, biases, embeddings
LINEAR = "linear"    # nn.Linear weight [out, in] -> input-major [in, out]
CONV = "conv"        # depthwise Conv1d weight [C, 1, K] -> taps-major [K, C]
TRANSFORMS = (COPY, LINEAR, CONV)

# What a tensor is, for random initialisation (training's init and random HF checkpoints).
INIT_KINDS = (
    "embed",      # an embedding table
    "weight",     # a projection (LINEAR / CONV)
    "residual",   # a projection whose output is added to the residual stream (o, down, out)
    "norm",       # an RMSNorm weight that multiplies: around 1
    "norm_zc",    # a zero-centred RMSNorm weight (x_hat * (1 + w)): around 0
    "bias",       # an additive bias: around 0
    "ones",       # a positive offset that starts at 1 (Gated DeltaNet dt_bias)
    "log_decay",  # log of a decay rate (Gated DeltaNet A_log): log U(1, 16), as the reference
)
PROJECTIONS = ("gate", "up", "down")
BIASES = ("gate_bias", "up_bias", "down_bias")   # the expert biases' names (TierPool fields, stack keys)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One dense parameter: `shape` is ours (input-major), `hf_name` the HF tensor it is made from."""
    shape: tuple[int, ...]
    hf_name: str
    transform: str = COPY
    init: str = "weight"

    def __post_init__(self):
        if self.transform not in TRANSFORMS or self.init not in INIT_KINDS:
            raise ValueError(f"{self.hf_name}: bad transform '{self.transform}' or init '{self.init}'")

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.transform == LINEAR:
            return self.shape[::-1]
        if self.transform == CONV:
            k, c = self.shape
            return (c, 1, k)
        return self.shape

    def from_hf(self, a: np.ndarray) -> np.ndarray:
        """The HF tensor (hf_shape) -> ours (shape); a view where possible."""
        if self.transform == LINEAR:
            return a.T
        if self.transform == CONV:
            return a[:, 0, :].T
        return a

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        """Ours (shape) -> the HF tensor (hf_shape), contiguous."""
        if self.transform == LINEAR:
            a = a.T
        elif self.transform == CONV:
            a = a.T[:, None, :]
        return np.ascontiguousarray(a)


@dataclasses.dataclass(frozen=True)
class Experts:
    """The routed experts of one MoE layer: E SwiGLU experts, ours gate/up [E, H, I], down [E, I, H].

    On the HF side, under `prefix` (e.g. "model.layers.3.mlp.experts."), either per expert
    (`{e}.gate_proj.weight` [I, H], `{e}.down_proj.weight` [H, I], what transformers writes to
    disk) or fused (`gate_up_proj` [E, 2I, H] with the gate rows first, `down_proj` [E, H, I],
    the in-memory layout of transformers 5). `hf_projections` names the per-expert tensors of
    gate, up and down (Mixtral and Phi-3.5-MoE: w1, w3, w2)."""
    num_experts: int
    hidden: int
    inter: int
    prefix: str
    hf_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # Class attributes: the HF layouts (the first is what transformers' save_pretrained writes), and
    # whether the experts have biases beside their weights (GptOssExperts).
    LAYOUTS = ("per_expert", "fused")
    has_bias = False

    @property
    def saved_layout(self) -> str:
        return self.LAYOUTS[0]

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        E, H, I = self.num_experts, self.hidden, self.inter
        return {"gate": (E, H, I), "up": (E, H, I), "down": (E, I, H)}

    @property
    def bias_shapes(self) -> dict[str, tuple[int, int]]:
        """Our bias stacks (BIASES) -> shape; {} for experts without biases."""
        E, H, I = self.num_experts, self.hidden, self.inter
        return dict(zip(BIASES, ((E, I), (E, I), (E, H)))) if self.has_bias else {}

    def hf_dtypes(self, layout: str) -> dict[str, str]:
        """HF tensors of `layout` that are not float weights -> their safetensors dtype (none here)."""
        return {}

    def layout(self, names) -> str:
        """The layout a checkpoint holding tensors `names` uses for this layer."""
        return "fused" if self.prefix + "gate_up_proj" in names else "per_expert"

    def per_expert_names(self) -> dict[str, list[str]]:
        return {proj: [f"{self.prefix}{e}.{hf}.weight" for e in range(self.num_experts)]
                for proj, hf in zip(PROJECTIONS, self.hf_projections)}

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of every tensor of this layer in `layout`."""
        E, H, I = self.num_experts, self.hidden, self.inter
        if layout == "fused":
            return {self.prefix + "gate_up_proj": (E, 2 * I, H), self.prefix + "down_proj": (E, H, I)}
        per_proj, names = {"gate": (I, H), "up": (I, H), "down": (H, I)}, self.per_expert_names()
        return {names[proj][e]: per_proj[proj] for e in range(E) for proj in PROJECTIONS}

    def from_hf(self, layout: str, read: Callable[[str], np.ndarray], experts: range | None = None
                ) -> dict[str, np.ndarray]:
        """Read this layer's HF tensors one at a time (per expert: into one preallocated stack per
        projection, so E separate arrays and the stack are never held at once) -> our stacks, of
        every expert or only of the range `experts` (a converter works a few experts at a time;
        a fused tensor is indexed [a:b], which a lazy tensor from `read` can serve by reading
        only those rows)."""
        rows = slice(None) if experts is None else slice(experts.start, experts.stop)
        if layout == "fused":
            gate_up, I = read(self.prefix + "gate_up_proj")[rows], self.inter
            return {"gate": gate_up[:, :I].transpose(0, 2, 1), "up": gate_up[:, I:].transpose(0, 2, 1),
                    "down": read(self.prefix + "down_proj")[rows].transpose(0, 2, 1)}
        out = {}
        for proj, names in self.per_expert_names().items():
            names = names[rows]
            first = read(names[0])
            stack = np.empty((len(names),) + first.shape, first.dtype)
            stack[0] = first
            for e, name in enumerate(names[1:], 1):
                stack[e] = read(name)
            out[proj] = stack.transpose(0, 2, 1)
        return out

    def to_hf(self, stacks: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """Our stacks -> (name, tensor) in the per-expert layout, expert by expert."""
        names = self.per_expert_names()
        for e in range(self.num_experts):
            for proj in PROJECTIONS:
                yield names[proj][e], np.ascontiguousarray(np.asarray(stacks[proj][e]).T)


Spec = Tensor | Experts


def expert_bytes(cfg, fmt) -> int:
    """Bytes of one routed expert of ModelConfig cfg in tier format fmt: weights, scales and, where
    the family's experts have them (gpt-oss), their float biases, as the tier pools hold them."""
    from dynaexq_jax.model.families import family
    from dynaexq_jax.model.quant import expert_nbytes
    bias = any(spec.has_bias for _, _, spec in leaves(family(cfg.model_type).abstract(cfg))
               if isinstance(spec, Experts))
    return expert_nbytes(fmt, cfg.hidden_size, cfg.moe_intermediate_size, bias)


def leaves(tree) -> list[tuple[int | None, str, Spec]]:
    """(layer index, or None outside the layers; dotted path within it; spec) of every leaf of an
    abstract tree, in tree order: e.g. (None, "embed", ...), (3, "attn.q", ...), (3, "mlp.experts", ...)."""
    out = []
    for path, spec in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [k.name if isinstance(k, jax.tree_util.GetAttrKey) else k.idx for k in path]
        layer = None
        if names[0] == "layers":
            layer, names = names[1], names[2:]
        out.append((layer, ".".join(names), spec))
    return out


def values(tree, params) -> list:
    """The leaves of params (a tree of the same structure as the abstract tree), aligned with
    leaves(tree); None where params holds no array for a spec (experts not attached)."""
    return jax.tree.structure(tree).flatten_up_to(params)
