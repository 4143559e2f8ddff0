"""Prompt padding, stop handling and the greedy token choice, shared by generation, the server and
the offloading baselines."""
import numpy as np

from dynaexq_jax.serving.generate import pad_prompts, trim_at_stop


def test_pad_prompts_right_pads_to_one_bucket():
    tokens, lengths = pad_prompts([[5, 6, 7], [8] * 17])
    assert tokens.shape == (2, 32) and tokens.dtype == np.int32 and lengths.tolist() == [3, 17]
    assert tokens[0, :3].tolist() == [5, 6, 7] and not tokens[0, 3:].any() and tokens[1, :17].tolist() == [8] * 17


def test_trim_at_stop_keeps_the_first_stop_token():
    rows = np.array([[4, 2, 9, 2], [4, 5, 6, 7], [2, 2, 2, 2]])
    assert trim_at_stop(rows, np.array([2, 9], np.int32)) == [[4, 2], [4, 5, 6, 7], [2]]
    assert trim_at_stop(rows, np.array([], np.int32)) == rows.tolist()     # no stop tokens: never stop


def test_greedy_tokens_are_argmax_ties_and_nans_included():
    """The first maximum of each row, as jnp.argmax (and its first NaN where a row has one)."""
    import jax.numpy as jnp

    from dynaexq_jax.serving.sampling import greedy_tokens
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4096)).astype(np.float32)
    logits[1, [7, 300, 4000]] = 9.0                         # a tie: the first wins
    logits[2, [5, 9]] = np.nan
    logits[3, :] = -np.inf
    logits[4, 4095] = np.inf
    got = np.asarray(greedy_tokens(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    assert got.dtype == np.int32 and list(got[1:5]) == [7, 5, 0, 4095]
