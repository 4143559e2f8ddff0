"""Plots of a generation's runtime timeline (`dynaexq generate --stats FILE`, then `dynaexq plot FILE`):
expert residency over time and the hotness heatmap, one panel per MoE layer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import DynaexqError


def _grid(n: int):
    cols = min(4, n)
    return -(-n // cols), cols


def plot_stats(stats_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats_path = Path(stats_path)
    try:
        data = json.loads(stats_path.read_text())
        timeline = data["runtime"]["timeline"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DynaexqError(f"{stats_path}: not a stats file written by `dynaexq generate --budget ... --stats` "
                           f"({type(e).__name__}: {e})") from None
    if not timeline:
        raise DynaexqError(f"{stats_path}: the runtime timeline is empty")
    out_dir = Path(out_dir) if out_dir else stats_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [t["step"] for t in timeline]
    masks = np.array([t["hi_mask"] for t in timeline], float)      # [boundaries, L, E]
    scores = np.array([t["scores"] for t in timeline], float)
    policy = data["runtime"].get("policy", "?")
    written = []
    for name, cube, cmap, label in (("residency", masks, "Greys", "HI (black) / LO (white)"),
                                    ("hotness", scores, "viridis", "hotness EMA S[l, e]")):
        L = cube.shape[1]
        rows, cols = _grid(L)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for l in range(rows * cols):
            ax = axes[l // cols][l % cols]
            if l >= L:
                ax.axis("off")
                continue
            im = ax.imshow(cube[:, l, :].T, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, cube.shape[2] - 0.5))
            ax.set_title(f"MoE layer {l}", fontsize=9)
            ax.set_xlabel("decode step", fontsize=8)
            ax.set_ylabel("expert", fontsize=8)
            if name == "hotness":
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{label} over time, policy {policy}")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
