"""Tests for attn.masks: bottom-right alignment worked examples, windows, padding, combine."""

import numpy as np
import pytest

from attn import masks
from attn.registry import ConfigError


def test_causal_bottom_right_l2_s4():
    # Two new queries after two cached keys: query 0 is position 2, query 1 is position 3.
    expected = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(masks.causal_mask(2, 4), expected)


def test_causal_square_is_lower_triangular():
    np.testing.assert_array_equal(masks.causal_mask(5, 5), np.tril(np.ones((5, 5), bool)))


def test_causal_more_queries_than_keys():
    # L=4 > S=2: the first two queries sit before every key and see nothing.
    expected = np.array([[0, 0], [0, 0], [1, 0], [1, 1]], bool)
    np.testing.assert_array_equal(masks.causal_mask(4, 2), expected)


def test_window_one_causal_is_diagonal():
    np.testing.assert_array_equal(masks.window_mask(4, 4, 1, causal=True), np.eye(4, dtype=bool))
    np.testing.assert_array_equal(
        masks.window_mask(2, 4, 1, causal=True), np.array([[0, 0, 1, 0], [0, 0, 0, 1]], bool)
    )


def test_window_one_noncausal_is_diagonal():
    np.testing.assert_array_equal(masks.window_mask(4, 4, 1, causal=False), np.eye(4, dtype=bool))


@pytest.mark.parametrize("L,S", [(3, 3), (2, 5), (5, 2)])
@pytest.mark.parametrize("window", [None, 1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_formula(L, S, window, causal):
    pos = np.arange(L)[:, None] + S - L
    rel = pos - np.arange(S)[None, :]
    expected = np.ones((L, S), bool)
    if causal:
        expected &= rel >= 0
    if window is not None:
        expected &= np.abs(rel) < window
    np.testing.assert_array_equal(masks.window_mask(L, S, window, causal), expected)


def test_block_indices_match_full_mask():
    full = masks.window_mask(7, 9, 3, causal=True)
    q_idx, k_idx = np.array([2, 3, 4]), np.array([5, 6, 7, 8])
    block = masks.window_mask(7, 9, 3, causal=True, q_idx=q_idx, k_idx=k_idx)
    np.testing.assert_array_equal(block, np.asarray(full)[2:5, 5:9])


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_bad_window_raises(window):
    with pytest.raises(ConfigError, match="window"):
        masks.window_mask(3, 3, window, causal=False)


def test_padding_mask():
    q_valid = np.array([[1, 1, 0]], bool)
    k_valid = np.array([[1, 0, 1, 1]], bool)
    m = masks.padding_mask(q_valid, k_valid)
    assert m.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(m[0, 0], np.outer(q_valid[0], k_valid[0]))
    assert masks.padding_mask(None, k_valid).shape == (1, 1, 1, 4)
    assert masks.padding_mask(q_valid, None).shape == (1, 1, 3, 1)
    assert masks.padding_mask(None, None) is None


def test_segment_mask():
    seg = np.array([[1, 1, 2, 2, 0]])
    m = masks.segment_mask(seg, seg)
    assert m.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(m[0, 0], seg[0][:, None] == seg[0][None, :])


def test_combine():
    a = np.array([[True, False], [True, True]])
    b = np.array([[False, True], [True, True]])[None, None]
    np.testing.assert_array_equal(masks.combine(a, None, b), (a & b))
    assert masks.combine(None, None) is None
    np.testing.assert_array_equal(masks.combine(a), a)
