"""Device-memory budget -> number of HI slots per MoE layer (DynaExq, arXiv 2511.15015: capacity).

    M_resident = sum_l [ n_hi[l] * m_hi + (E - n_hi[l]) * m_lo ]
    M_trans    = K * max expert size                  (K transfers in flight)
    M_resident + M_trans <= budget - M_fixed

M_fixed is computed, not guessed: the dense parameter bytes (the family schema's shapes in the
dense dtype), the KV cache for the configured batch and max length, the workspace of the compiled
prefill chunk and decode segment for the chosen backend and platform (workspace_bytes, checked
against XLA's memory analysis: measured_workspace), and a safety margin. Slot counts are fixed at
start-up; at run time only WHICH experts hold them changes.

Everything a plan needs is metadata: a converted checkpoint's (read_info) or, before converting,
a Hugging Face config's (planned_checkpoint); model_info takes either. A budget is bytes or a
share of each layer's experts in HI ('25%', resolve_budget).

The margin is the only cost that grows with the budget, so the smallest budget that holds a plan
is found in closed form (smallest_budget); the offloading baselines' planner (offload.plan_cache)
shares the fixed costs and that inversion.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
import re
from pathlib import Path

import jax
import numpy as np

from dynaexq_jax.errors import (
    BudgetError,
    CheckpointNotFoundError,
    ConfigError,
    InfeasibleBudgetError,
    RuntimeConfigError,
    check_int,
)
from dynaexq_jax.model.config import ModelConfig, parse_hf_config, read_hf_config
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.moe import ExpertPools, TierPool, cpu_kernel
from dynaexq_jax.model.moe import xla as xla_moe
from dynaexq_jax.model.quant import (
    BIAS_DTYPE,
    SCALE_DTYPE,
    Format,
    QTensor,
    TierFormat,
    fit_tier_format,
    parse_dense_format,
    parse_format,
    parse_tier_format,
)
from dynaexq_jax.runtime.config import EngineConfig, check_plan_options
from dynaexq_jax.serving.checkpoint import METADATA_FILE, CheckpointInfo, read_info
from dynaexq_jax.serving.generate import SEGMENT_LEN

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'20GiB', '512MiB', '1.5GB', '1000000' -> bytes (the decimal read exactly, then rounded down)."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"cannot parse the budget '{text}' (examples: 20GiB, 512MiB, 1.5GB, 1000000)")
        value = math.floor(fractions.Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise BudgetError(f"the budget must be positive, got {text!r}")
    return value


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """Bytes in the largest binary unit that fits, with two decimals. round_up: rounded up to
    those decimals instead of to the nearest, so that parse_bytes of the text is never below n
    (for a lower bound such as the smallest feasible budget, which a user pastes back)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            if round_up:
                hundredths = -(-math.ceil(n) * 100 // size)
                return f"{hundredths // 100}.{hundredths % 100:02d} {unit}"
            return f"{n / size:.2f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


@dataclasses.dataclass(frozen=True)
class FixedCosts:
    dense_params: int
    kv_cache: int
    workspace: int
    margin: int

    @property
    def total(self) -> int:
        return self.dense_params + self.kv_cache + self.workspace + self.margin

    @property
    def reserved(self) -> int:
        """Bytes of the budget kept free of anything the runtime owns: workspace and margin."""
        return self.workspace + self.margin

    def rows(self) -> list[tuple[str, int]]:
        return [("dense parameters", self.dense_params), ("KV cache / recurrent state", self.kv_cache),
                ("activations / workspace", self.workspace), ("safety margin", self.margin)]


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
    """Bytes of the family's decode cache (KV, and conv + recurrent state for hybrid models),
    read off its abstract shapes so that every family is counted exactly."""
    shapes = jax.eval_shape(lambda: family(cfg.model_type).init_cache(cfg, batch, max_len, dtype))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


# The safety margin kept free of any plan, as a share of the budget.
MARGIN_FRACTION = 0.02


def margin_bytes(budget: int, margin_fraction: float = MARGIN_FRACTION) -> int:
    return int(margin_fraction * budget)


# ---- the workspace: what the compiled prefill chunk and decode segment need -----------------------
# Written from the code each term models and checked against XLA's memory analysis of both programs
# (measured_workspace, tests/test_budget.py). "widen": a 16-bit model on the CPU, where XLA
# multiplies 16-bit weights in f32 (it widens them into f32 copies for its dots) and copies a 16-bit
# cache's bits around each write (layers.write_cache); not on a GPU.
def _attention_bytes(cfg: ModelConfig, B: int, C: int, S: int, q_out: int, item: int, widen: bool) -> int:
    """A full-attention layer on C new tokens per row over a cache of S positions (layers.attend):
    q/k/v before and after norm + RoPE, the scores f32 [B*nKV, rep*C, S] and the probabilities
    (in place when f32), the output; widened, the bits of the layer's 16-bit K and V caches."""
    N, kv = B * C, cfg.num_kv_heads * cfg.head_dim
    probs = item if item < 4 else 0
    return (N * (2 * (q_out + 2 * kv) + cfg.num_heads * cfg.head_dim) * item
            + B * cfg.num_heads * C * S * (4 + probs) + (2 * B * kv * S * 2 if widen else 0))


def _linear_attention_bytes(cfg: ModelConfig, B: int, C: int, item: int) -> int:
    """A Gated DeltaNet layer on C tokens per row (qwen3_next.gated_delta_net): the fused
    projections and the conv in the activation dtype and f32, then for the chunked delta rule
    about sixteen f32 [B, C, nV, d] tensors and three f32 [64, 64] blocks per 64 tokens and value
    head (the per-token recurrence of decode: the state's updates)."""
    nK, nV, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    N = B * C
    conv = 2 * nK * dk + nV * dv
    proj = N * (2 * nK * dk + 2 * nV * dv + 2 * nV) * item + N * conv * (2 * item + 4)
    if C == 1:
        return proj + B * nV * (4 * dk + 4 * dv + 2 * dk * dv) * 4
    chunk = min(64, C)
    padded = B * -(-C // chunk) * chunk
    return proj + 4 * padded * nV * (16 * max(dk, dv) + 3 * chunk)


def _moe_bytes(cfg: ModelConfig, tokens: int, backend: str, hi: Format, lo: Format, dtype, kernel: bool,
               widen: bool) -> int:
    """The MoE MLP on `tokens` tokens: the router's softmax and top-k, the routed experts' op of
    the backend (the CPU kernel's: its f32 outputs and its own scratch for each tier, XLA's: its
    largest group of dequantized blocks, Pallas's: the sorted pairs' rows), the shared expert."""
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    P, item = tokens * k, np.dtype(dtype).itemsize
    routing = 2 * tokens * E * 4 + 6 * P * 4
    if backend == "pallas":
        op = P * (H * item + I * item + 2 * H * 4) + 4 * P * 4
    elif kernel:
        op = 2 * (cpu_kernel.scratch_bytes(tokens, k, H, I) + tokens * H * 4)
    else:
        op = xla_moe.workspace_bytes(hi, lo, tokens, k, E, H, I, dtype, len(cfg.moe_layers), widen)
    return routing + op + 3 * tokens * cfg.shared_expert_intermediate_size * item


def _forward_bytes(cfg: ModelConfig, B: int, C: int, S: int, backend: str, hi: Format, lo: Format, dtype,
                   kernel: bool, widen: bool) -> int:
    """One forward of C tokens per row over a cache of S positions: the residual stream and the
    largest of a layer's phases (its token mixer, its MLP), then the logits of one position per
    row (layers.logits with logits_at) and their selection."""
    N, H, V, item = B * C, cfg.hidden_size, cfg.vocab_size, np.dtype(dtype).itemsize
    fam = family(cfg.model_type)
    if hasattr(fam, "attention_workspace_bytes"):   # a family with its own attention (e.g. MLA)
        attention = fam.attention_workspace_bytes(cfg, B, C, S, item, widen)
    else:
        q_out = max((spec.shape[1] for _, key, spec in schema.leaves(fam.abstract(cfg)) if key == "attn.q"),
                    default=0)
        attention = _attention_bytes(cfg, B, C, S, q_out, item, widen)
    phases = [attention if cfg.attention_layers else 0,
              _linear_attention_bytes(cfg, B, C, item) if cfg.linear_layers else 0,
              _moe_bytes(cfg, N, backend, hi, lo, dtype, kernel, widen) if cfg.moe_layers else 0,
              3 * N * cfg.intermediate_size * item if cfg.dense_layers else 0]
    return 4 * N * H * item + max(phases) + 3 * B * V * 4


def workspace_bytes(cfg: ModelConfig, batch: int, max_len: int, prefill_len: int, backend: str,
                    hi: Format, lo: Format, dtype=np.float32, dense_params: int = 0,
                    platform: str | None = None, prefill_batch: int | None = None) -> int:
    """Peak transient device memory of serving: the larger of the compiled prefill chunk
    (prefill_batch, default batch, x min(prefill_len, max_len) tokens over a max_len cache; a
    server prefills one joining request at a time) and the decode segment (batch tokens a
    step: sampling over the vocabulary; the segment's stacked outputs, some KB of router mass,
    are left to the margin, so that the plan does not depend on the segment length). dtype: the
    dense parameters' (and the activations', but f32 where the kernels serve a 16-bit model:
    cpu_kernel.residual_dtype). platform: where it runs (default: JAX's default
    backend; "pallas" runs on a GPU): the CPU kernel's scratch counts where it serves, and on the
    CPU with 16-bit dense weights (dense_params bytes) and without the kernel's matmul, the decode
    loop holds f32 copies of all of them, which XLA widens once per segment, outside the loop."""
    platform = "gpu" if backend == "pallas" else (platform or jax.default_backend())
    kernel = cpu_kernel.serves(backend, platform)
    widen = platform == "cpu" and np.dtype(dtype).itemsize < 4
    act = cpu_kernel.residual_dtype(dtype, backend, platform)   # f32 for a 16-bit model on the kernels
    # Widened, the prefill chunk holds f32 copies of weights its long products read: counted as one
    # of the head (XLA's copy, or where the kernel reads the head in place, a layer's projections,
    # which cpu_kernel.dense_matmul ties to their inputs so that one layer's live at a time). The
    # decode loop holds f32 copies of every dense weight unless the kernel's matmul reads them in
    # place (products of few rows).
    in_place = platform == "cpu" and cpu_kernel.enabled() and batch <= cpu_kernel.MATMUL_MAX_ROWS
    prefill = (_forward_bytes(cfg, prefill_batch or batch, min(prefill_len, max_len), max_len, backend, hi, lo, act,
                              kernel, widen)
               + (4 * cfg.hidden_size * cfg.vocab_size if widen else 0))
    decode = (_forward_bytes(cfg, batch, 1, max_len, backend, hi, lo, act, kernel, widen)
              + 4 * batch * cfg.vocab_size * 4 + (2 * dense_params if widen and not in_place else 0))
    return max(prefill, decode)


def measured_workspace(cfg: ModelConfig, *, hi: Format, lo: Format, n_hi: int, dtype, batch: int, max_len: int,
                       prefill_len: int, backend: str, segment_len: int = SEGMENT_LEN) -> dict[str, int]:
    """What XLA's memory analysis says the compiled prefill chunk and decode segment need at these
    shapes, lowered from abstract arrays (nothing is allocated; seconds at any model size):
    {"prefill": bytes, "decode": bytes}, each the program's temporaries plus its outputs that do
    not alias an input (the cache is donated). workspace_bytes bounds both; the CPU kernel's own
    scratch is not in them (XLA does not see it)."""
    from dynaexq_jax.serving.generate import decode_segment, prefill_chunk
    from dynaexq_jax.serving.sampling import Sampling

    def array(shape, dt):
        return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dt))

    def pool(tier: TierFormat | Format, slots: int, spec: schema.Experts) -> TierPool:
        def weight(k, n, proj):
            fmt = parse_tier_format(tier).of(proj)
            scales = array((slots, k // fmt.group_for(k), n), SCALE_DTYPE) if fmt.is_int else None
            zeros = scales if fmt.has_zeros else None
            return QTensor(array((slots, fmt.packed_rows(k), n), fmt.storage_dtype), scales, fmt, zeros)
        H, I = spec.hidden, spec.inter
        biases = {name: array((slots,) + shape[1:], BIAS_DTYPE) for name, shape in spec.bias_shapes.items()}
        return TierPool(weight(H, I, "gate"), weight(H, I, "up"), weight(I, H, "down"), **biases)

    def leaf(spec):
        if isinstance(spec, schema.Experts):
            E = spec.num_experts
            return ExpertPools((pool(hi, n_hi, spec), pool(lo, E - n_hi, spec)), array((E,), np.int32),
                               array((E,), np.int32))
        return array(spec.shape, dtype)
    fam = family(cfg.model_type)
    params = jax.tree.map(leaf, fam.abstract(cfg))
    cache = jax.eval_shape(lambda: fam.init_cache(cfg, batch, max_len, dtype))
    scores = array((len(cfg.moe_layers), cfg.num_experts), np.float32)
    C = min(prefill_len, max_len)
    prefill = prefill_chunk.lower(params, cfg, array((batch, C), np.int32), array((batch,), np.int32),
                                  array((), np.int32), cache, array((batch, cfg.vocab_size), np.float32), scores,
                                  backend=backend)
    decode = decode_segment.lower(params, cfg, cache, array((batch,), np.int32), array((batch,), bool),
                                  array((), np.int32), jax.eval_shape(lambda: jax.random.PRNGKey(0)),
                                  array((1,), np.int32), scores, steps=segment_len, sampling=Sampling(),
                                  alpha=0.5, backend=backend)

    def need(lowered) -> int:
        m = lowered.compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    return {"prefill": need(prefill), "decode": need(decode)}


def fixed_costs(cfg: ModelConfig, *, budget: int, dense_params: int, batch: int, max_len: int,
                prefill_len: int | None, cache_dtype, backend: str, hi: Format, lo: Format,
                margin_fraction: float = MARGIN_FRACTION, platform: str | None = None,
                prefill_batch: int | None = None) -> FixedCosts:
    """M_fixed of the method: the dense params, the cache, the workspace (prefill_len: tokens per
    sequence in one prefill forward, None: a whole max_len prompt at once; prefill_batch: sequences
    prefilled together, None: batch), the margin."""
    return FixedCosts(dense_params, cache_bytes(cfg, batch, max_len, cache_dtype),
                      workspace_bytes(cfg, batch, max_len, prefill_len or max_len, backend, hi, lo, cache_dtype,
                                      dense_params, platform, prefill_batch),
                      margin_bytes(budget, margin_fraction))


def smallest_budget(plan, margin_fraction: float = MARGIN_FRACTION) -> int:
    """The smallest budget b that holds everything `plan` (a BudgetPlan or offload CachePlan)
    holds besides its margin: b - margin(b) >= plan.total - plan.fixed.margin. b - margin(b)
    never decreases as b grows, so the closed form b = need / (1 - margin fraction) is off only
    by the margin's rounding down, corrected here."""
    need = plan.total - plan.fixed.margin

    def fits(b):
        return b - margin_bytes(b, margin_fraction) >= need
    b = math.ceil(need / (1 - margin_fraction))
    while not fits(b):
        b += 1
    while fits(b - 1):
        b -= 1
    return b


def smallest_budget_text(budget: int) -> str:
    """How an error names the smallest feasible budget: rounded up, so that pasting it back works."""
    return f"{format_bytes(budget, round_up=True)} ({budget:,d} B)"


# The staging K copies reserve is capped here: 576 MiB is ~24 ms of copies at PCIe 4.0 rates, which
# keeps the copy engine busy through a segment of tens of ms (it is K = 64 of Qwen3-30B-A3B's 9 MiB
# bf16 experts); more would only take HI slots from models with large experts (64 of Mixtral-8x7B's
# 336 MiB bf16 experts would be 21 GiB). Never less than one swap (an HI and a LO copy).
STAGING_CAP = 576 * 2**20


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    budget: int
    fixed: FixedCosts
    m_hi: int                       # bytes of one expert in the HI tier
    m_lo: int
    transfers_in_flight: int        # K
    strategy: str
    n_hi: tuple[int, ...]           # HI slots per MoE layer (cfg.moe_layers order), of one device
    num_experts: int                # experts per layer on one device
    devices: int = 1                # devices of the expert-parallel mesh, each with this plan

    @property
    def staging(self) -> int:
        """Bytes of transfer staging: K copies of the largest expert, at most STAGING_CAP (or one swap)."""
        return min(self.transfers_in_flight * max(self.m_hi, self.m_lo), max(STAGING_CAP, self.m_hi + self.m_lo))

    def layer_bytes(self, i: int) -> int:
        return self.n_hi[i] * self.m_hi + (self.num_experts - self.n_hi[i]) * self.m_lo

    @property
    def resident(self) -> int:
        return sum(self.layer_bytes(i) for i in range(len(self.n_hi)))

    @property
    def total(self) -> int:
        return self.fixed.total + self.resident + self.staging

    @property
    def hi_fraction(self) -> float:
        return sum(self.n_hi) / max(1, self.num_experts * len(self.n_hi))

    def rows(self) -> list[tuple[str, int]]:
        n_lo = self.num_experts * len(self.n_hi) - sum(self.n_hi)
        return self.fixed.rows() + [
            (f"HI experts ({sum(self.n_hi)} x {format_bytes(self.m_hi)})", sum(self.n_hi) * self.m_hi),
            (f"LO experts ({n_lo} x {format_bytes(self.m_lo)})", n_lo * self.m_lo),
            (f"transfer staging (K={self.transfers_in_flight}"
             f"{', capped' if self.staging < self.transfers_in_flight * max(self.m_hi, self.m_lo) else ''})",
             self.staging),
            ("total", self.total), ("budget", self.budget), ("unused", self.budget - self.total)]

    def table(self) -> str:
        lines = [f"{name:<40} {format_bytes(b):>12} {b:>16,d}" for name, b in self.rows()]
        each = f" on each of {self.devices} devices" if self.devices > 1 else ""
        lines.append(f"{'HI slots per MoE layer' + each:<40} {', '.join(map(str, self.n_hi))}  "
                     f"({100 * self.hi_fraction:.1f}% of experts, strategy {self.strategy})")
        return "\n".join(lines)


def plan_budget(cfg: ModelConfig, *, budget: int | str, hi: Format, lo: Format, dense_params: int,
                batch: int, max_len: int, prefill_len: int | None = None, cache_dtype=np.float32,
                backend: str = "xla", transfers_in_flight: int = 4, margin_fraction: float = MARGIN_FRACTION,
                strategy: str = "proportional", max_hi_fraction: float = 1.0,
                layer_priority: np.ndarray | None = None, platform: str | None = None,
                prefill_batch: int | None = None, devices: int = 1) -> BudgetPlan:
    """Fix the number of HI slots per MoE layer for a budget.

    devices > 1: the plan of one device of an expert-parallel mesh (model.moe.sharded): the
    budget is that device's, it holds the dense parameters, cache and workspace (replicated) and
    E / devices experts of every layer, and n_hi counts its own HI slots.

    uniform: the same n for every layer; proportional: n_hi[l] = floor(r * E_l) with the largest
    ratio r that fits (binary search); greedy: add HI slots one at a time to the layer whose next
    expert has the highest priority (layer_priority [L_moe, E], e.g. a calibration ranking's
    scores, sorted per layer; equal priorities give round-robin). max_hi_fraction caps r.
    platform: where the plan is served (workspace_bytes; default: this process's JAX backend)."""
    budget = parse_bytes(budget)
    check_plan_options(strategy, transfers_in_flight, max_hi_fraction)
    check_int("devices", devices, RuntimeConfigError)
    if cfg.num_experts % devices:
        raise RuntimeConfigError(f"{cfg.num_experts} experts per layer do not split evenly across {devices} devices")
    E, L = cfg.num_experts // devices, len(cfg.moe_layers)
    fixed = fixed_costs(cfg, budget=budget, dense_params=dense_params, batch=batch, max_len=max_len,
                        prefill_len=prefill_len, cache_dtype=cache_dtype, backend=backend, hi=hi, lo=lo,
                        margin_fraction=margin_fraction, platform=platform, prefill_batch=prefill_batch)
    m_hi, m_lo = (schema.expert_bytes(cfg, f) for f in (hi, lo))
    if m_hi < m_lo:
        raise RuntimeConfigError(f"the HI tier ({hi.name}) must not be smaller than the LO tier ({lo.name})")

    def make(n_hi):
        return BudgetPlan(budget, fixed, m_hi, m_lo, transfers_in_flight, strategy, tuple(int(n) for n in n_hi), E,
                          devices)

    floor_plan = make([0] * L)
    if floor_plan.total > budget:
        raise InfeasibleBudgetError(
            f"budget {format_bytes(budget)} ({budget:,d} B) cannot hold the model even with every expert in "
            f"the LO tier ({lo.name}): {floor_plan.total - budget:,d} B missing; the smallest feasible budget is "
            f"{smallest_budget_text(smallest_budget(floor_plan, margin_fraction))}")
    cap = int(math.floor(max_hi_fraction * E))
    if strategy == "uniform":
        n = max(k for k in range(cap + 1) if make([k] * L).total <= budget)
        return make([n] * L)
    if strategy == "proportional":
        lo_r, hi_r = 0.0, max_hi_fraction
        for _ in range(50):
            mid = (lo_r + hi_r) / 2
            if make([math.floor(mid * E + 1e-9)] * L).total <= budget:
                lo_r = mid
            else:
                hi_r = mid
        return make([math.floor(lo_r * E + 1e-9)] * L)
    prio = np.zeros((L, E)) if layer_priority is None else -np.sort(-np.asarray(layer_priority, float), axis=1)
    n = [0] * L
    spare = budget - floor_plan.total
    step = m_hi - m_lo
    while spare >= step:
        open_layers = [l for l in range(L) if n[l] < cap]
        if not open_layers:
            break
        # Highest next-expert priority first; among equals the layer with fewest slots, then lowest index.
        l = max(open_layers, key=lambda l: (prio[l, n[l]], -n[l], -l))
        n[l] += 1
        spare -= step
    return make(n)


# ---- a model under engine settings: a converted checkpoint, its metadata, or a Hugging Face config -------
# Where `dynaexq convert` says "source" (the source checkpoint's dtype), a config says it in torch_dtype
# (transformers 5: dtype); the converter's defaults, for a plan made before converting.
_CONFIG_DTYPES = {"float32": "f32", "float64": "f32", "bfloat16": "bf16", "float16": "fp16"}
CONVERT_DEFAULTS = dict(hi="source", lo="int4", dtype="source")


def checkpoint_sizes(info: CheckpointInfo) -> dict:
    """The plan_budget arguments a converted checkpoint fixes, from its metadata alone: both tiers,
    the dense parameter bytes (the family schema's shapes in its dense dtype) and the cache dtype
    (the dense parameters')."""
    return dict(hi=info.tiers["hi"], lo=info.tiers["lo"], dense_params=info.dense_nbytes,
                cache_dtype=np.dtype(info.dense_format.storage_dtype))


def planned_checkpoint(source: str | Path, *, hi: str = CONVERT_DEFAULTS["hi"], lo: str = CONVERT_DEFAULTS["lo"],
                       dtype: str = CONVERT_DEFAULTS["dtype"]) -> CheckpointInfo:
    """What `dynaexq convert` with these tiers and dense dtype would write, from a Hugging Face
    model directory or its config.json alone (no weight is read): a CheckpointInfo without
    metadata. Raises the typed errors of a bad config or format."""
    f = Path(source) / "config.json" if Path(source).is_dir() else Path(source)
    hf = read_hf_config(f)
    cfg = parse_hf_config(hf)
    declared = hf.get("torch_dtype") or hf.get("dtype")

    source_fmt = parse_format(_CONFIG_DTYPES[declared]) if declared in _CONFIG_DTYPES else None

    def resolved(spec: str, what: str) -> str:
        if source_fmt is None and "source" in str(spec).lower():
            raise ConfigError(f"{f}: {what} 'source' is the model's dtype, but its torch_dtype is {declared!r}; "
                              f"name a format instead (e.g. bf16)")
        return str(spec)
    # Fitted as the converter fits them.
    tiers = {t: fit_tier_format(resolved(spec, what), cfg.hidden_size, cfg.moe_intermediate_size, source_fmt)[0]
             for t, spec, what in (("hi", hi, "--hi"), ("lo", lo, "--lo"))}
    dense = parse_dense_format(resolved(dtype, "--dtype"), source_fmt)
    return CheckpointInfo(Path(source), cfg, hf, tiers, dense, metadata={})


def model_info(path: str | Path, **conversion) -> CheckpointInfo:
    """A converted checkpoint's metadata (read_info: no tensor is read), or for a Hugging Face model
    directory or config.json the checkpoint a conversion with `conversion` (hi, lo, dtype; None:
    the converter's defaults) would write (planned_checkpoint)."""
    path = Path(path)
    given = {k: v for k, v in conversion.items() if v is not None}
    if (path / METADATA_FILE).is_file():
        if given:
            raise RuntimeConfigError(f"{path} is a converted checkpoint: its tiers and dtype are fixed, so "
                                     f"{', '.join('--' + k for k in given)} (for a Hugging Face config) do not apply")
        return read_info(path)
    if path.is_file() or (path / "config.json").is_file():
        return planned_checkpoint(path, **given)
    raise CheckpointNotFoundError(f"{path}: neither a converted checkpoint ({METADATA_FILE}) nor a Hugging Face "
                                  f"model directory or config.json")


def plan_for(model: CheckpointInfo, budget: int | str, settings: EngineConfig, **overrides) -> BudgetPlan:
    """plan_budget for a model served with `settings`; overrides replace plan_budget arguments.
    A policy that fixes every expert's tier (all-hi, all-lo) caps the HI share at its own and,
    unless an override sets the cap, needs every layer to get it. Policy 'sensitivity' on a
    checkpoint with stored LO costs plans by them (what its Engine plans by)."""
    fixed = settings.policy_type.fixed_hi_fraction
    options = checkpoint_sizes(model) | settings.plan_options()
    if settings.policy == "sensitivity" and model.lo_costs is not None:
        options["layer_priority"] = settings.make_policy(model).slot_priority(settings.default_ranking(model))
    if fixed is not None:
        options["max_hi_fraction"] = fixed
    plan = plan_budget(model.config, budget=budget, **(options | overrides))
    devices = overrides.get("devices", settings.devices)
    want = None if fixed is None else round(fixed * model.config.num_experts // devices)
    if want is not None and "max_hi_fraction" not in overrides and any(n != want for n in plan.n_hi):
        smallest = budget_for_fraction(model, fixed, settings, **overrides)
        raise InfeasibleBudgetError(
            f"policy '{settings.policy_type.name}' needs every expert {'HI' if fixed else 'LO'}; the budget "
            f"{plan.budget:,d} B fits only {list(plan.n_hi)} HI slots per layer; the smallest that fits "
            f"{want} is {smallest_budget_text(smallest)}")
    return plan


def budget_for_fraction(model: CheckpointInfo, r: float, settings: EngineConfig, **overrides) -> int:
    """The smallest byte budget whose plan for `settings` gives floor(r * E) HI slots per MoE
    layer, or with the greedy strategy as many in all, spread by its priority. Closed form: the
    plan capped at r under an unlimited budget (equal slots), then smallest_budget of it."""
    capped = plan_for(model, 2**62, settings, **(overrides | {"max_hi_fraction": r, "strategy": "uniform"}))
    budget = smallest_budget(capped)
    # Equal-slot strategies give equal slots, so the same total is the same plan; greedy spreads it.
    got = plan_for(model, budget, settings, **(overrides | {"max_hi_fraction": settings.max_hi_fraction})).n_hi
    if sum(got) != sum(capped.n_hi):
        raise RuntimeConfigError(f"no budget gives {list(capped.n_hi)} HI slots per layer with strategy "
                                 f"'{settings.strategy}' and max_hi_fraction {settings.max_hi_fraction}")
    return budget


def parse_share(text) -> float | None:
    """'25%' -> 0.25 (a share of each MoE layer's experts in HI); None for anything else (a size)."""
    if not isinstance(text, str) or not text.strip().endswith("%"):
        return None
    try:
        r = float(text.strip()[:-1]) / 100
    except ValueError:
        raise BudgetError(f"cannot read the budget share '{text}' (e.g. 25%)") from None
    if not 0 <= r <= 1:
        raise BudgetError(f"a budget share must be between 0% and 100%, got '{text}'")
    return r


def resolve_budget(budget: int | str, model: CheckpointInfo, settings: EngineConfig, **overrides) -> int:
    """A budget as bytes ('20GiB', '1.5GB', 10**9) or as a share of each MoE layer's experts in HI
    ('25%': the smallest budget whose plan for `settings` gives floor(0.25 E) HI slots a layer)."""
    r = parse_share(budget)
    return parse_bytes(budget) if r is None else budget_for_fraction(model, r, settings, **overrides)


def budget_report(model: CheckpointInfo, budget: int | str, settings: EngineConfig, **overrides) -> dict:
    """The plan for `budget` as plain data (what `dynaexq budget --json` prints): every fixed cost,
    the HI slots per layer and the resident expert bytes (None where infeasible, with the error;
    with devices=N in overrides, all of one device's, whose budget it is),
    and the smallest feasible budget (for a policy that fixes every tier, the smallest that holds
    it), rounded up to a byte. Bytes are exact integers."""
    fixed = settings.policy_type.fixed_hi_fraction
    smallest = budget_for_fraction(model, fixed or 0.0, settings, **overrides)
    budget = resolve_budget(budget, model, settings, **overrides)
    try:
        plan, error = plan_for(model, budget, settings, **overrides), None
        costs = plan.fixed
    except InfeasibleBudgetError as e:
        # Only the margin depends on the budget: the other costs are the smallest feasible plan's.
        plan, error = None, str(e)
        costs = dataclasses.replace(plan_for(model, smallest, settings, **overrides).fixed,
                                    margin=margin_bytes(budget))
    cfg, sizes = model.config, checkpoint_sizes(model)
    return dict(model=str(model.path), model_type=cfg.model_type, moe_layers=len(cfg.moe_layers),
                num_experts=cfg.num_experts, devices=overrides.get("devices", settings.devices), hi=sizes["hi"].name,
                lo=sizes["lo"].name,
                dense_dtype=model.dense_format.name, budget_bytes=budget, feasible=plan is not None, error=error,
                hi_slots_per_layer=list(plan.n_hi) if plan else None, min_feasible_bytes=smallest,
                dense_bytes=costs.dense_params, kv_cache_bytes=costs.kv_cache, workspace_bytes=costs.workspace,
                margin_bytes=costs.margin,
                expert_hi_bytes=schema.expert_bytes(cfg, sizes["hi"]),
                expert_lo_bytes=schema.expert_bytes(cfg, sizes["lo"]),
                expert_bytes=plan.resident if plan else None, staging_bytes=plan.staging if plan else None,
                total_bytes=plan.total if plan else None,
                settings=dict(policy=settings.policy_type.name, **(settings.plan_options() | overrides)))
