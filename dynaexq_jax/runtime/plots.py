"""Plots of a generation's runtime timeline (`dynaexq generate --stats FILE`, then `dynaexq plot FILE`):
expert residency over time and the hotness heatmap, one panel per MoE layer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import DynaexqError

_WRITTEN_BY = "expected a stats file written by `dynaexq generate MODEL --budget SIZE --stats FILE`"


def read_timeline(stats_path: str | Path) -> tuple[list[dict], str]:
    """(the runtime timeline, the policy name) of a stats file; a one-line DynaexqError naming what
    is missing otherwise."""
    stats_path = Path(stats_path)
    try:
        data = json.loads(stats_path.read_text())
    except FileNotFoundError:
        raise DynaexqError(f"{stats_path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DynaexqError(f"{stats_path}: cannot be read ({e}); {_WRITTEN_BY}") from None
    except json.JSONDecodeError as e:
        raise DynaexqError(f"{stats_path}: not JSON ({e.msg} at line {e.lineno}); {_WRITTEN_BY}") from None
    runtime = data.get("runtime") if isinstance(data, dict) else None
    if not isinstance(runtime, dict):
        raise DynaexqError(f"{stats_path}: no 'runtime' section (generated without --budget?); {_WRITTEN_BY}")
    timeline = runtime.get("timeline")
    if not isinstance(timeline, list) or not timeline:
        raise DynaexqError(f"{stats_path}: the runtime timeline ('runtime.timeline') is missing or empty")
    for i, entry in enumerate(timeline):
        missing = [k for k in ("step", "hi_mask", "scores") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DynaexqError(f"{stats_path}: runtime.timeline[{i}] has no {', '.join(repr(k) for k in missing)}")
    return timeline, str(runtime.get("policy", "?"))


def _grid(n: int):
    cols = min(4, n)
    return -(-n // cols), cols


def timeline_figures(timeline: list[dict], policy: str) -> dict:
    """{"residency": Figure, "hotness": Figure}, one panel per MoE layer. Every panel of a figure
    shares one colour scale (residency: LO 0, HI 1; hotness: 0 .. the largest score anywhere),
    so that colours compare across layers, and the figure's one colourbar says what they mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    steps = [t["step"] for t in timeline]
    masks = np.array([t["hi_mask"] for t in timeline], float)      # [boundaries, L, E]
    scores = np.array([t["scores"] for t in timeline], float)
    figures = {}
    for name, cube, cmap, vmax, label in (
            ("residency", masks, ListedColormap(["white", "black"]), 1.0, "expert tier"),
            ("hotness", scores, "viridis", max(float(scores.max()), 1e-12), "hotness EMA S[l, e]")):
        L, E = cube.shape[1], cube.shape[2]
        rows, cols = _grid(L)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 2.6 * rows), squeeze=False,
                                 layout="constrained")
        for l in range(rows * cols):
            ax = axes[l // cols][l % cols]
            if l >= L:
                ax.axis("off")
                continue
            im = ax.imshow(cube[:, l, :].T, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                           vmin=0.0, vmax=vmax, extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5))
            ax.set_title(f"MoE layer {l}", fontsize=9)
            ax.set_xlabel("decode step", fontsize=8)
            ax.set_ylabel("expert", fontsize=8)
        bar = fig.colorbar(im, ax=axes, fraction=0.03)
        bar.set_label(label)
        if name == "residency":
            bar.set_ticks([0.25, 0.75], labels=["LO", "HI"])
        fig.suptitle(f"{label} over time, policy {policy}")
        figures[name] = fig
    return figures


def plot_stats(stats_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write residency.png and hotness.png of a stats file (beside it unless out_dir is given)."""
    timeline, policy = read_timeline(stats_path)
    out_dir = Path(out_dir) if out_dir else Path(stats_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = timeline_figures(timeline, policy)
    import matplotlib.pyplot as plt
    written = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
