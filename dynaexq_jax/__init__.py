"""dynaexq-jax: dynamic expert quantization for Mixture-of-Experts serving in JAX."""
from dynaexq_jax.errors import DynaexqError

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a converted checkpoint: returns a Model with .config, .logits(ids), .generate(...)."""
    from dynaexq_jax.api import load as _load
    return _load(path, **kwargs)


__all__ = ["load", "DynaexqError", "__version__"]
