"""The hotness EMA's per-step and per-position forms (serving/hotness.py) agree with stepping it
one step at a time, on numpy and on jax arrays."""
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.serving.hotness import ema_over_positions, ema_update, position_mass


def stepped(scores, masses, alpha):
    for m in masses:
        scores = alpha * scores + (1 - alpha) * m
    return scores


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99])
def test_per_position_update_equals_one_step_per_position(alpha):
    rng = np.random.default_rng(0)
    s0, mass = rng.random((3, 8)).astype(np.float32), rng.random((16, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ema_over_positions(jnp.asarray(s0), jnp.asarray(mass), alpha)),
                               stepped(s0.astype(np.float64), mass, alpha), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("xp", [np, jnp])
def test_a_chunk_mean_for_chunk_steps_equals_stepping_it(xp):
    rng = np.random.default_rng(1)
    s0, m = rng.random((2, 4)), rng.random((2, 4))
    out = ema_update(xp.asarray(s0), xp.asarray(m), 0.9, steps=8)
    assert isinstance(out, type(xp.asarray(s0)))
    np.testing.assert_allclose(np.asarray(out), stepped(s0, [m] * 8, 0.9), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ema_update(xp.asarray(s0), xp.asarray(m), 0.9)),
                               0.9 * s0 + 0.1 * m, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_padding_positions_are_no_steps(alpha):
    """A position where every row is padding leaves the EMA as it was (scoring a padded batch)."""
    rng = np.random.default_rng(2)
    s0, mass = rng.random((3, 8)).astype(np.float32), rng.random((12, 3, 8)).astype(np.float32)
    active = rng.random(12) < 0.6
    got = ema_over_positions(jnp.asarray(s0), jnp.asarray(mass), alpha, jnp.asarray(active))
    np.testing.assert_allclose(np.asarray(got), stepped(s0.astype(np.float64), mass[active], alpha), rtol=1e-5,
                               atol=1e-6)


def test_position_mass_averages_over_the_real_rows_only():
    rng = np.random.default_rng(3)
    B, C, k, E = 3, 5, 2, 6
    ids = jnp.asarray(np.stack([[rng.choice(E, k, replace=False) for _ in range(C)] for _ in range(B)]))
    probs = jnp.asarray(rng.random((B, C, k)), jnp.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    got = np.asarray(position_mass((ids,), (probs,), E, C, jnp.asarray(valid)))[:, 0]
    for c in range(C):
        want = np.zeros(E)
        for b in np.flatnonzero(valid[:, c]):
            np.add.at(want, np.asarray(ids[b, c]), np.asarray(probs[b, c]))
        np.testing.assert_allclose(got[c], want / max(valid[:, c].sum(), 1), rtol=1e-6)
