"""lm-evaluation-harness on the live runtime: importing this package registers the lm-eval model
`dynaexq` (model.DynaexqLM) and makes the project's local task suite (TASKS_DIR) available to
lm-eval's TaskManager (include_path). `dynaexq eval` (run.py) drives it from the command line.
lm-eval is an optional extra: pip install -e ".[eval]"."""
from pathlib import Path

try:
    import lm_eval  # noqa: F401
except ImportError as e:
    from dynaexq_jax.errors import EvaluationError
    raise EvaluationError('lm-eval is not installed: pip install -e ".[eval]" (the optional extra)') from e

from dynaexq_jax.lm_eval.model import POLICIES, DynaexqLM

# The local task suite: lm-eval YAMLs over JSONL built from the default model's held-out documents.
TASKS_DIR = Path(__file__).parent / "tasks"

__all__ = ["DynaexqLM", "POLICIES", "TASKS_DIR"]
