"""scripts/anatomy.py's report: mean ± sd and shares of the gap over seeds, from experiments and from
seeds recorded before their experiments were removed."""

import json
import sys

from conftest import load_script


def _run(shift):
    rows = {"text_only_nospk_": 1.75, "text_only_": 1.74, "text_oracle_nospk_": 1.58, "text_oracle_": 1.58,
            "taste_plain_": 1.73, "taste_plain_rvq_": 1.70, "": 1.52, "taste_rvq_": 1.50, "speech_frames_": 0.34}
    return {**{f"{p}nll": v + shift for p, v in rows.items()}, "taste_rvq_bitrate_bps": 120.0, "rev": "abc1234",
            "targets": "stand-in"}


def test_the_report_joins_recorded_seeds_to_the_experiments(tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/anatomy.py")
    monkeypatch.setattr(mod, "experiments", lambda prefix, all_commits: {1: _run(0.0), 2: _run(0.02)})
    recorded = tmp_path / "rec.json"
    recorded.write_text(json.dumps({"seeds": {"1337": {"commit": "681338e", **{k: v for k, v in _run(0.01).items() if k != "rev"}},
                                              "2": {"commit": "old", "nll": 9.0}}}))
    monkeypatch.setattr(sys, "argv", ["anatomy.py", "--report-only", "--recorded", str(recorded)])
    mod.main()
    out = capsys.readouterr().out
    assert "seeds [1, 2, 1337]" in out and "681338e" in out  # seed 2's experiment wins over its record
    row = next(line for line in out.splitlines() if line.startswith("| taste_rvq + durations"))
    # Share = (1.74 - 1.50) / (1.74 - 0.34) on every seed (the shift cancels): 17.1 % with no spread.
    assert "| 1.5100 ± 0.0100 | 17.1 % ± 0.0 | 120 |" in row
