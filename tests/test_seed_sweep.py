"""scripts/seed_sweep.py's report: the topline column and the gap-closed lines, mean ± sd over seeds."""

import importlib.util
from pathlib import Path


def _sweep():
    spec = importlib.util.spec_from_file_location("seed_sweep", Path(__file__).parents[1] / "scripts" / "seed_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seed, nll, gap):
    row = {"seed": seed, "targets": "stand-in", "num_utterances": 3, "copy_prev_top1_acc": 0.4, "gap_closed_nll": gap,
           "speech_bits_per_s": 1.0 + gap}
    for prefix, base in (("", nll), ("text_only_", 2.5), ("shuffled_speech_", 2.6), ("speech_frames_", 1.5)):
        row.update({prefix + "nll": base, prefix + "top1_acc": 0.4, prefix + "change_top1_acc": 0.1})
    return row


def test_report_has_the_topline_and_the_gap_closed_per_seed(capsys):
    _sweep().report({"a": _run(1, 2.4, 0.1), "b": _run(2, 2.2, 0.3), "c": _run(2, 9.9, 0.9)})  # seed 2 twice: first wins
    out = capsys.readouterr().out
    assert "| metric | speech_frames (topline) | taste | text_only | shuffled_speech |" in out
    assert "| nll | 1.5000 ± 0.0000 | 2.3000 ± 0.1414 | 2.5000 ± 0.0000 | 2.6000 ± 0.0000 |" in out
    assert "taste gap_closed_nll, per seed: [0.1, 0.3]  mean 0.2000 ± 0.1414" in out


def test_report_adds_taste_rvq_and_free_running_when_every_run_has_them(capsys):
    runs = {}
    for i, (seed, gap) in enumerate(((1, 0.1), (2, 0.2))):
        r = _run(seed, 2.4, 0.1)
        for prefix in ("", "text_only_", "speech_frames_", "taste_rvq_"):
            r.update({prefix + "free_uer": 0.5 + i, prefix + "free_length_error": 0.1, prefix + "free_no_end": 0.0})
        r.update({"taste_rvq_nll": 2.45, "taste_rvq_top1_acc": 0.4, "taste_rvq_change_top1_acc": 0.1,
                  "taste_rvq_gap_closed_nll": gap, "taste_rvq_bitrate_bps": 100.0})
        runs[str(seed)] = r
    _sweep().report(runs)
    out = capsys.readouterr().out
    assert "| metric | speech_frames (topline) | taste | taste_rvq | text_only | shuffled_speech |" in out
    assert "| free_uer | 1.0000 ± 0.7071 | 1.0000 ± 0.7071 | 1.0000 ± 0.7071 | 1.0000 ± 0.7071 |  |" in out
    assert "taste_rvq gap_closed_nll, per seed: [0.1, 0.2]  mean 0.1500 ± 0.0707" in out
    assert "taste_rvq bitrate_bps, per seed: [100.0, 100.0]" in out
    _sweep().report({k: {m: v for m, v in r.items() if "free_" not in m} for k, r in runs.items()})
    assert "free_uer" not in capsys.readouterr().out
