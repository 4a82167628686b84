import math

import numpy as np
import pytest

from taste_pipeline import metrics


def _p(pred, target, nll=None):
    end = [-1]
    return {"pred": np.array(pred + end), "target": np.array(target + end),
            "nll": np.array((nll or [1.0] * len(target)) + [9.0])}


def test_scores_by_hand():
    # targets 1 1 2 2 3: changes at positions 2 and 4
    s = metrics.score([_p([1, 1, 1, 2, 3], [1, 1, 2, 2, 3], [0.5, 0.5, 1.0, 1.0, 2.0])])
    assert s["top1_acc"] == pytest.approx(4 / 5)
    assert s["change_top1_acc"] == pytest.approx(1 / 2)
    assert s["first_token_acc"] == 1.0
    assert s["nll"] == pytest.approx(1.0)  # END's 9.0 is not a unit position


def test_copy_prev_baseline():
    t = np.array([4, 4, 5, 5, 5, 6])
    base = metrics.baseline_preds([t], [np.array([7, 7, 7, 4])])
    s = metrics.score(base["copy_prev"])
    assert s["top1_acc"] == pytest.approx(3 / 6)  # first is 7 (wrong), then 3 repeats right
    assert s["change_top1_acc"] == 0.0
    assert metrics.score(base["most_frequent"])["top1_acc"] == 0.0


def test_derangement_has_no_fixed_points_and_is_seeded():
    p = metrics.derangement(50, 3)
    assert sorted(p) == list(range(50)) and all(i != j for i, j in enumerate(p))
    assert p == metrics.derangement(50, 3)
    with pytest.raises(ValueError):
        metrics.derangement(1, 0)


def test_per_position_bins():
    preds = [_p([1] * 55, [1] * 30 + [2] * 25) for _ in range(2)]
    rows = metrics.per_position(preds, bin_size=25)
    assert [r["seconds"] for r in rows] == [0.0, 0.5]  # the 5-unit tail bin has 10 < 20 samples
    assert rows[0]["top1_acc"] == 1.0 and rows[1]["top1_acc"] == pytest.approx(5 / 25)


def test_wide_rows_give_one_column_per_system():
    curves = {"a": [{"s": 0.0, "v": 0.1}, {"s": 0.5, "v": 0.2}], "b": [{"s": 0.5, "v": 0.3}]}
    assert metrics.wide(curves, "s", "v") == [{"s": 0.0, "a": 0.1, "b": None}, {"s": 0.5, "a": 0.2, "b": 0.3}]


def test_gap_closed_and_speech_bits():
    text_only = {"nll": 2.5, "top1_acc": 0.40, "change_top1_acc": 0.10}
    topline = {"nll": 1.5, "top1_acc": 0.60, "change_top1_acc": 0.50}
    v = {"nll": 2.25, "top1_acc": 0.45, "change_top1_acc": 0.20}
    g = metrics.gap_metrics(v, text_only, topline)
    assert g["gap_closed_nll"] == pytest.approx(0.25) and g["gap_closed_top1_acc"] == pytest.approx(0.25)
    assert g["gap_closed_change_top1_acc"] == pytest.approx(0.25)
    assert g["speech_bits_per_s"] == pytest.approx(0.25 * 50 / math.log(2))
    assert metrics.gap_metrics(topline, text_only, topline)["gap_closed_nll"] == pytest.approx(1.0)
    assert metrics.gap_metrics(text_only, text_only, None) == {"speech_bits_per_s": 0.0}
