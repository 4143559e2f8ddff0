"""The budgeted runtime's settings: one frozen EngineConfig that holds every default and checks
every value, used by the Engine, the CLI, the demo, the comparison harness and the examples.

Defaults that lower levels need as well are defined there and only referenced here: the hotness
EMA factor (serving.hotness.ALPHA), the segment length and the prefill chunk
(serving.generate.SEGMENT_LEN, PREFILL_CHUNK) and the dynamic policies' update period and
hysteresis (runtime.policies)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from dynaexq_jax.errors import RuntimeConfigError, check_int
from dynaexq_jax.model.moe import BACKENDS
from dynaexq_jax.runtime.policies import DELTA, UPDATE_PERIOD, Policy, check_update_options, make_policy, policy_class
from dynaexq_jax.serving.generate import PREFILL_CHUNK, SEGMENT_LEN
from dynaexq_jax.serving.hotness import ALPHA

if TYPE_CHECKING:
    from dynaexq_jax.serving.checkpoint import CheckpointInfo


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise RuntimeConfigError(f"unknown backend '{backend}' (use one of {', '.join(BACKENDS)})")


STRATEGIES = ("uniform", "proportional", "greedy")   # HI slots per layer (budget.plan_budget)


def check_plan_options(strategy: str, transfers_in_flight: int, max_hi_fraction: float) -> None:
    if strategy not in STRATEGIES:
        raise RuntimeConfigError(f"unknown capacity strategy '{strategy}' (use one of {', '.join(STRATEGIES)})")
    check_int("transfers_in_flight", transfers_in_flight, RuntimeConfigError, minimum=2,
              unit=" (a swap moves two copies)")
    if not 0.0 <= max_hi_fraction <= 1.0:
        raise RuntimeConfigError(f"max_hi_fraction must be in [0, 1], got {max_hi_fraction}")


# The options only the budgeted path uses, by the name the CLI (--rate-limit) and the lm-eval model
# args (rate_limit=) give them -> the EngineConfig field that holds the default.
RUNTIME_OPTIONS = {"policy": "policy", "strategy": "strategy", "transfers": "transfers_in_flight",
                   "period": "update_period", "delta": "delta", "rate_limit": "rate_limit", "alpha": "alpha"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the runtime serves a model under a budget (the model, the budget and a calibration
    ranking are the Engine's own arguments). Every value is checked on construction, so a bad
    setting fails before anything is loaded."""
    # A name ('dynaexq', 'static', 'all-hi', 'all-lo', 'random', 'sensitivity': by the checkpoint's
    # stored LO costs) or a Policy.
    policy: str | Policy = "dynaexq"
    segment_len: int = SEGMENT_LEN     # decode steps per jitted segment, = positions per scoring chunk
    batch: int = 1                     # the largest batch served (sizes the KV cache inside the budget)
    max_len: int = 512                 # the longest sequence served (sizes the KV cache; the scoring window)
    prefill_chunk: int = PREFILL_CHUNK  # prompt positions per prefill forward (sizes the workspace)
    prefill_batch: int | None = None   # prompts prefilled together, at most batch (None: batch; the server: 1)
    # An expert-parallel mesh of the first `devices` devices (model.moe.sharded): each layer's experts
    # split across them, the rest replicated; the budget, the HI slots and the staging are per device.
    devices: int = 1
    strategy: str = "proportional"     # HI slots per layer: uniform, proportional or greedy (budget.plan_budget)
    # K: transfer staging of K copies of the largest expert; swaps fly while their bytes (m_hi + m_lo
    # each) fit (runtime.transfers). 64: on Qwen3-30B-A3B bf16/int4, 576 MiB staging (1.8% of 32 GiB),
    # 50 swaps per segment for the whole model, ~24 ms of copies at PCIe 4.0 rates (~0.4 ms per HI
    # copy): the copy engine is busy for much of a segment (tens of ms) and a boundary's copies arrive
    # before the next; a workload shift (~20 swaps in each of 48 layers) is absorbed in ~20 segments.
    # The staging is capped at budget.STAGING_CAP (576 MiB) for models with larger experts.
    transfers_in_flight: int = 64
    alpha: float = ALPHA               # hotness EMA factor per step
    update_period: int = UPDATE_PERIOD  # T_u: steps between policy updates, counted across requests
    delta: float = DELTA               # hysteresis margin (dynaexq)
    rate_limit: int | None = None      # swaps per layer per update, None = no cap (dynaexq)
    backend: str = "xla"               # the MoE op's backend: xla, xla-only or pallas
    hotness_in_prefill: bool = True    # whether the prefill counts as one hotness step
    max_hi_fraction: float = 1.0       # a cap on the share of HI slots per layer
    deterministic: bool = True         # publish at the next boundary, waiting for copies (Engine)
    # Wait for the dispatched segment before publishing into its pool slots: needed on the CPU
    # backend (an in-place write was observed to overtake an earlier reader); whether a GPU
    # needs it is what benchmarks/gpu_check.py measures (False skips the wait).
    drain_before_publish: bool = True

    def __post_init__(self):
        if isinstance(self.policy, str):
            policy_class(self.policy)
        elif not isinstance(self.policy, Policy):
            raise RuntimeConfigError(f"policy must be a policy name or a Policy, got {self.policy!r}")
        for name in ("segment_len", "batch", "max_len", "prefill_chunk", "devices"):
            check_int(name, getattr(self, name), RuntimeConfigError)
        if self.prefill_batch is not None:
            check_int("prefill_batch", self.prefill_batch, RuntimeConfigError)
            if self.prefill_batch > self.batch:
                raise RuntimeConfigError(f"prefill_batch ({self.prefill_batch}) must not exceed batch ({self.batch})")
        check_plan_options(self.strategy, self.transfers_in_flight, self.max_hi_fraction)
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha < 1.0):
            raise RuntimeConfigError(f"hotness EMA alpha must be in [0, 1), got {self.alpha!r}")
        check_update_options(self.update_period, self.delta, self.rate_limit)
        check_backend(self.backend)

    def replace(self, **settings) -> EngineConfig:
        """A copy with some settings changed (checked again); unknown names are an error."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise RuntimeConfigError(f"unknown engine settings {unknown} (EngineConfig has "
                                     f"{', '.join(f.name for f in dataclasses.fields(self))})")
        return dataclasses.replace(self, **settings)

    @property
    def policy_type(self) -> type[Policy]:
        """The policy's class: what planning needs of it (fixed_hi_fraction, name) without building it."""
        return policy_class(self.policy) if isinstance(self.policy, str) else type(self.policy)

    def make_policy(self, checkpoint: CheckpointInfo | None = None) -> Policy:
        """The policy object: a given Policy as is, a name with the settings it takes (sensitivity:
        the LO costs the checkpoint stores, CheckpointInfo.lo_costs)."""
        dynaexq = dict(period=self.update_period, delta=self.delta, rate_limit=self.rate_limit)
        options = {"dynaexq": dynaexq, "random": dict(period=self.update_period)}
        if self.policy == "sensitivity":
            costs = None if checkpoint is None else checkpoint.lo_costs
            if costs is None:
                raise RuntimeConfigError(
                    f"{checkpoint.path if checkpoint is not None else 'no checkpoint'}: policy 'sensitivity' ranks "
                    f"by what each expert's LO copy costs, which a conversion with calibration text stores: this "
                    f"checkpoint has none (dynaexq convert ... --calibration FILE)")
            options["sensitivity"] = dict(dynaexq, cost=costs)
        return make_policy(self.policy, **(options.get(self.policy, {}) if isinstance(self.policy, str) else {}))

    def default_ranking(self, checkpoint: CheckpointInfo) -> np.ndarray | None:
        """The ranking [L_moe, E] the policy starts from (and plans by) when none is given: for
        'sensitivity', the traffic its conversion measured beside the costs; None otherwise."""
        return checkpoint.routed_mass if self.policy == "sensitivity" else None

    def plan_options(self) -> dict:
        """The budget.plan_budget arguments these settings fix."""
        # The longest forward: a prefill chunk, or a scoring chunk of segment_len positions.
        return dict(batch=self.batch, max_len=self.max_len, prefill_len=max(self.prefill_chunk, self.segment_len),
                    prefill_batch=self.prefill_batch, devices=self.devices, backend=self.backend,
                    strategy=self.strategy, transfers_in_flight=self.transfers_in_flight,
                    max_hi_fraction=self.max_hi_fraction)
