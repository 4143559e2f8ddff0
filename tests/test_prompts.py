"""Prompt padding and stop handling, shared by generation and the offloading baselines."""
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
