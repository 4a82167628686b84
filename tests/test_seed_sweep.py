"""scripts/seed_sweep.py: one run per seed, mean ± sd of every system's metrics and of the gaps closed."""

import pytest

from conftest import load_script


def _sweep():
    return load_script("scripts/seed_sweep.py")


def _run(seed, nll, gap):
    row = {"seed": seed, "targets": "stand-in", "num_utterances": 3, "copy_prev_top1_acc": 0.4, "gap_closed_nll": gap,
           "speech_bits_per_s": 1.0 + gap}
    for prefix, base in (("", nll), ("text_only_", 2.5), ("shuffled_speech_", 2.6), ("speech_frames_", 1.5)):
        row.update({prefix + "nll": base, prefix + "top1_acc": 0.4, prefix + "change_top1_acc": 0.1})
    return row


def test_one_run_per_seed_and_the_spread_over_seeds():
    s = _sweep().summarize({"a": _run(1, 2.4, 0.1), "b": _run(2, 2.2, 0.3), "c": _run(2, 9.9, 0.9)})  # seed 2 twice: first wins
    assert s["seeds"] == [1, 2]
    assert list(s["systems"]) == ["speech_frames", "taste", "text_only", "shuffled_speech"]
    mean, sd = s["systems"]["taste"]["nll"]
    assert mean == pytest.approx(2.3) and sd == pytest.approx(0.1414, abs=1e-4)
    assert s["systems"]["text_only"]["nll"] == (2.5, 0.0)
    assert s["gaps"][("taste", "gap_closed_nll")]["per_seed"] == [0.1, 0.3]
    assert s["controls"][("text_only", "nll")]["per_seed"] == pytest.approx([0.1, 0.3])  # positive: taste better


def test_taste_rvq_and_free_running_count_only_when_every_run_has_them():
    runs = {}
    for i, (seed, gap) in enumerate(((1, 0.1), (2, 0.2))):
        r = _run(seed, 2.4, 0.1)
        for prefix in ("", "text_only_", "speech_frames_", "taste_rvq_"):
            r.update({prefix + "free_uer": 0.5 + i, prefix + "free_length_error": 0.1, prefix + "free_no_end": 0.0})
        r.update({"taste_rvq_nll": 2.45, "taste_rvq_top1_acc": 0.4, "taste_rvq_change_top1_acc": 0.1,
                  "taste_rvq_gap_closed_nll": gap, "taste_rvq_bitrate_bps": 100.0})
        runs[str(seed)] = r
    s = _sweep().summarize(runs)
    assert list(s["systems"]) == ["speech_frames", "taste", "taste_rvq", "text_only", "shuffled_speech"]
    assert s["systems"]["taste_rvq"]["free_uer"] == pytest.approx((1.0, 0.7071), abs=1e-4)
    assert s["gaps"][("taste_rvq", "gap_closed_nll")]["mean_sd"] == pytest.approx((0.15, 0.0707), abs=1e-4)
    assert s["gaps"][("taste_rvq", "bitrate_bps")]["per_seed"] == [100.0, 100.0]
    del runs["2"]["taste_rvq_free_uer"]
    assert "free_uer" not in _sweep().summarize(runs)["systems"]["taste_rvq"]
    assert "free_uer" in _sweep().summarize(runs)["systems"]["taste"]


def test_the_rebuilt_speech_scores_and_the_true_units_row():
    runs = {}
    for seed, wer in ((1, 1.1), (2, 1.3), (3, 1.2)):
        r = _run(seed, 2.4, 0.1)
        for prefix, w in (("", wer), ("text_only_", 1.2), ("true_units_", 0.8)):
            r.update({prefix + "rebuilt_wer": w, prefix + "rebuilt_duration_corr": 0.9, prefix + "rebuilt_speaker_sim": 0.7})
        r.update({"rebuilt_wer_gap_closed": (1.2 - wer) / 0.4, "original_wer": 0.5})
        runs[str(seed)] = r
    s = _sweep().summarize(runs)
    assert s["systems"]["true_units"] == {"rebuilt_wer": (0.8, 0.0), "rebuilt_duration_corr": (0.9, 0.0),
                                          "rebuilt_speaker_sim": (0.7, 0.0)}
    assert s["systems"]["taste"]["rebuilt_wer"] == pytest.approx((1.2, 0.1))
    assert s["gaps"][("taste", "rebuilt_wer_gap_closed")]["per_seed"] == pytest.approx([0.25, -0.25, 0.0])
    assert s["original_wer"] == (0.5, 0.0)
    del runs["3"]["original_wer"]
    assert _sweep().summarize(runs)["original_wer"] is None
