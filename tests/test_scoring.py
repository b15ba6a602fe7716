"""The metrics a family can name: greedy CTC decoding and its two accuracies."""

from __future__ import annotations

import numpy as np
import pytest

from loom.core.errors import ModelError
from loom.model.scoring import ctc_accuracy, ctc_decode, label_sequences


def scores(paths: list[list[int]], classes: int = 6) -> np.ndarray:
    """One-hot [N, T, C] scores whose argmax follows each path."""
    out = np.zeros((len(paths), len(paths[0]), classes), np.float32)
    for n, path in enumerate(paths):
        out[n, np.arange(len(path)), path] = 1.0
    return out


def test_greedy_decoding_collapses_repeats_and_drops_blanks():
    got = ctc_decode(scores([[0, 3, 3, 0, 3, 5, 5, 0], [1, 1, 1, 0, 0, 2, 0, 0]]))
    assert got == [(3, 3, 5), (1, 2)]


def test_exact_and_character_accuracy():
    out = scores([[0, 3, 3, 0, 3, 5, 5, 0], [1, 1, 1, 0, 0, 2, 0, 0]])
    labels = np.array([[3, 3, 5, -1], [1, 2, 2, -1]])
    exact, chars = ctc_accuracy(out, labels)
    assert exact == 0.5
    assert chars == pytest.approx((1.0 + (1 - 1 / 3)) / 2)
    assert label_sequences(labels) == [(3, 3, 5), (1, 2, 2)]


def test_nonfinite_is_refused_or_wrong():
    out = scores([[0, 3, 0, 0], [2, 0, 0, 0]])
    out[1, 0, 0] = np.nan
    labels = np.array([[3], [2]])
    with pytest.raises(ModelError, match="non-finite"):
        ctc_accuracy(out, labels)
    assert ctc_accuracy(out, labels, nonfinite="wrong") == (0.5, 0.5)


def test_shapes_are_checked():
    with pytest.raises(ModelError, match=r"\[N, T, C\]"):
        ctc_decode(np.zeros((2, 5)))
    with pytest.raises(ModelError, match="padded"):
        ctc_accuracy(scores([[1, 0]]), np.array([1]))
