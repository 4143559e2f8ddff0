"""The figures say what they show: every colourbar labelled, one colour scale per figure (panels
compare), perplexity bars from zero, routed mass called routed mass, a perplexity gap called one."""
import json

import numpy as np
import pytest

from dynaexq_jax.experiments.compare import plot_results, result_figures
from dynaexq_jax.runtime.plots import plot_stats, timeline_figures


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def panel_images(fig):
    return [im for ax in fig.axes if ax.get_label() != "<colorbar>" for im in ax.images]


# ---- dynaexq plot --------------------------------------------------------------------------------
@pytest.fixture
def timeline():
    """5 boundaries, 3 MoE layers of 4 experts; layer l's hotness on a scale of (l + 1); layer 0
    all HI, layer 1 all LO (the cases a per-panel scale paints alike)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        mask = rng.random((3, 4)) < 0.5
        mask[0], mask[1] = True, False
        out.append({"step": 4 * i, "hi_mask": mask.tolist(),
                    "scores": (rng.random((3, 4)) * np.arange(1, 4)[:, None]).tolist()})
    return out


def test_timeline_figures_share_one_labelled_scale_per_figure(timeline):
    figs = timeline_figures(timeline, "dynaexq")
    assert set(figs) == {"residency", "hotness"}
    top = float(np.max([t["scores"] for t in timeline]))
    for name, want in (("residency", (0.0, 1.0)), ("hotness", (0.0, top))):
        images = panel_images(figs[name])
        assert len(images) == 3
        assert all(im.get_clim() == pytest.approx(want) for im in images), name
        assert colorbars(figs[name]) and all(bar.get_ylabel() for bar in colorbars(figs[name])), name


def test_plot_stats_writes_both_pngs(timeline, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"runtime": {"policy": "dynaexq", "timeline": timeline}}))
    written = plot_stats(stats, tmp_path / "plots")
    assert [p.name for p in written] == ["residency.png", "hotness.png"]
    assert all(p.stat().st_size > 0 for p in written)


# ---- dynaexq compare -----------------------------------------------------------------------------
@pytest.fixture
def results():
    """The parts of a results.json the plots read; perplexities near 40-60 as on the default model."""
    ppl = {"all-hi": 43.0, "all-lo": 59.0, "dynaexq": 48.0}
    rng = np.random.default_rng(1)
    return {
        "policies": {n: {"ppl": {"overall": p, "per_domain": {"prose": p + 4, "code": p - 7}},
                         "timeline": {"step": [16, 32, 48], "hit_rate": [0.3, 0.5, 0.4], "swaps": [0, 3, 1]}}
                     for n, p in ppl.items()},
        "workload": {"phases": ["prose", "code", "prose"], "phase_tokens": 16},
        "traffic": {"mass": {"prose": (rng.random((2, 8)) / 4).tolist(), "code": rng.random((2, 8)).tolist()}},
        "sweep": [{"hi_fraction": f, "policy": "dynaexq", "gap_recovery": {"overall": g}}
                  for f, g in ((0.0, 0.0), (0.2, 0.6), (0.4, None))],
    }


def test_perplexity_bars_start_at_zero(results):
    ax = result_figures(results)["perplexity"].axes[0]
    assert ax.get_ylim()[0] == 0


def test_routed_mass_is_called_so_and_shares_one_labelled_scale(results):
    figs = result_figures(results)
    assert "hotness" not in figs
    fig = figs["routed_mass"]
    assert "routed mass" in fig.get_suptitle()
    top = max(float(np.max(m)) for m in results["traffic"]["mass"].values())
    assert [im.get_clim() for im in panel_images(fig)] == [pytest.approx((0.0, top))] * 2
    assert colorbars(fig) and all("routed mass" in bar.get_ylabel() for bar in colorbars(fig))


def test_sweep_says_perplexity_gap(results):
    ax = result_figures(results)["sweep"].axes[0]
    assert "perplexity gap" in ax.get_ylabel() and "accuracy" not in f"{ax.get_title()} {ax.get_ylabel()}"
    # A recovery that is undefined (all-HI = all-LO) is left out, not drawn as 0%.
    assert np.isnan(ax.lines[0].get_ydata()[-1])


def test_plot_results_writes_every_figure(results, tmp_path):
    written = plot_results(results, tmp_path)
    assert sorted(p.name for p in written) == ["hit_rate.png", "perplexity.png", "routed_mass.png", "sweep.png"]
    assert all(p.stat().st_size > 0 for p in written)
