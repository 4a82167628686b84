"""scripts/scaling.py: shares of the gap per size and seed, the log-size fit and where it crosses a
share, resuming from the results file, and refusing to make a point from uncommitted code."""

import csv
import json
import math
import sys

import pytest

from conftest import load_script


def _metrics(size, shift=0.0):
    # text_only 2.0 and topline 1.0 (+ shift): a variant's share is 2.0 + shift - its nll; the shares
    # follow a + b log10(size) exactly
    default = 0.10 + 0.20 * math.log10(size / 250)
    plain = 0.02 + 0.05 * math.log10(size / 250)
    return {"text_only_nll": 2.0 + shift, "speech_frames_nll": 1.0 + shift, "taste_rvq_nll": 2.0 - default + shift,
            "nll": 2.0 - default - 0.01 + shift, "taste_plain_rvq_nll": 2.0 - plain + shift,
            "taste_plain_nll": 2.0 - plain + 0.01 + shift, "taste_rvq_rebuilt_wer_gap_closed": 0.3}


def _results(path, sizes=(250, 500, 1000), seeds=(1, 2)):
    runs = [{"train_utterances": n, "seed": s, "commit": "abcdef1234", "sets": [], "device": "cpu",
             "machine": "a CPU", "precision": "bfloat16", "targets": "stand-in (not S3)",
             "metrics": _metrics(n, 0.01 * s)} for n in sizes for s in seeds]
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_the_fit_recovers_a_log_size_trend_and_where_it_crosses():
    mod = load_script("scripts/scaling.py")
    a, b = mod.fit([(n, 0.1 + 0.2 * math.log10(n)) for n in (250, 500, 1000, 4000)])
    assert a == pytest.approx(0.1) and b == pytest.approx(0.2)
    assert mod.crossing((a, b), 0.5) == pytest.approx(100.0)
    assert mod.crossing((0.3, -0.01), 0.5) is None and mod.fit([(500, 0.1), (500, 0.2)]) is None
    assert mod.fmt([0.056]) == "5.6" and mod.fmt([0.05, 0.07]) == "6.0 ± 1.4"  # one seed shows no spread


def test_the_report_writes_the_table_csv_and_plot(tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/scaling.py")
    results = _results(tmp_path / "scaling.json")
    out_csv, png = tmp_path / "scaling.csv", tmp_path / "scaling.png"
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--report-only", "--results", str(results), "--csv", str(out_csv),
                                      "--png", str(png)])
    mod.main()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 1000 |"))
    # taste_rvq at 1000: 0.10 + 0.20 log10(4) = 22.0 %; the shift of each seed cancels in the share
    assert "| 1, 2 | abcdef1 |" in row and "22.0 ± 0.0" in row and "30.0 ± 0.0" in row
    assert "+ 20.0 % per tenfold" in out and "+ 5.0 % per tenfold" in out
    # TASTE's design reaches 40 % where 0.02 + 0.05 log10(n / 250) = 0.4: n = 250 * 10 ** 7.6
    line = next(x for x in out.splitlines() if "would reach 40 %" in x and "TASTE" in x)
    assert f"~{250 * 10 ** 7.6:,.0f}" in line
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6 and float(rows[0]["taste_rvq"]) == pytest.approx(10.0)
    wer = list(csv.DictReader((tmp_path / "scaling_wer.csv").open()))  # beside --csv, as dvc.yaml reads it
    assert len(wer) == 6 and float(wer[0]["taste_rvq"]) == pytest.approx(30.0) and wer[0]["taste_plain_rvq"] == ""
    assert png.stat().st_size > 10_000


def test_runs_resume_and_refuse_uncommitted_code(tmp_path, monkeypatch):
    mod = load_script("scripts/scaling.py")
    results = _results(tmp_path / "scaling.json", sizes=(250,), seeds=(1,))
    ran = []
    monkeypatch.setattr(mod, "run", lambda size, seed, sets, path: ran.append((size, seed)))
    monkeypatch.setattr(mod, "report", lambda *a: None)
    monkeypatch.setattr(mod, "machine", lambda sets: {"precision": "bfloat16"})
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--sizes", "250", "500", "--seeds", "1", "2", "--results", str(results)])
    mod.main()
    assert ran == [(250, 2), (500, 1), (500, 2)]
    # The same seed in another precision is another point: it runs again.
    ran.clear()
    monkeypatch.setattr(mod, "machine", lambda sets: {"precision": "float32"})
    mod.main()
    assert ran == [(250, 1), (250, 2), (500, 1), (500, 2)]
    monkeypatch.undo()
    monkeypatch.setattr(mod, "finished", lambda exp: ({}, ""))
    monkeypatch.setattr(mod, "machine", lambda sets: {})
    monkeypatch.setattr(mod, "git", lambda *a: " M src/taste_pipeline/model.py" if a[0] == "status" else "x")
    with pytest.raises(SystemExit, match="uncommitted"):
        mod.run(250, 1, [], results)


def test_the_dvc_plot_draws_every_variant_the_script_writes():
    """dvc.yaml's scaling plot names the CSV's columns; a renamed series would drop out of the plot silently."""
    from pathlib import Path

    import yaml

    mod = load_script("scripts/scaling.py")
    root = Path(__file__).parents[1]
    plots = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    for title, csv_name, columns in (("Gap closed against corpus size", "scaling.csv", [v for _, v, _ in mod.SERIES]),
                                     ("WER gap closed against corpus size", "scaling_wer.csv", list(mod.HEADLINE.values()))):
        entry = next(p[title] for p in plots if isinstance(p, dict) and title in p)
        assert entry["template"] == "scaling" and (root / ".dvc/plots/scaling.json").exists()
        csv_path = mod.ROOT / "docs/results" / csv_name
        assert entry["y"] == {str(csv_path.relative_to(root)): columns}
        if csv_path.exists():
            with open(csv_path) as f:
                assert next(csv.reader(f)) == [entry["x"], "seed", *columns]


@pytest.mark.slow
def test_the_direct_runner_makes_a_point_the_report_reads(tmp_path):
    """scripts/scaling_direct.py (the GPU machine's runner, no DVC), on a CPU at toy size and as gpu.sh runs
    it there, on tiny.en unpacked from bench/gpu_pack.py's file: every variant of the point trains and is
    scored, the record lands in the results file, and a rerun skips it."""
    import subprocess
    from pathlib import Path

    from taste_pipeline import whisper

    root = Path(__file__).parents[1]
    pack = load_script("bench/gpu_pack.py").pack_whisper(tmp_path / "tiny.en-fp16.safetensors")
    toy = ["synthesize.test_utterances=3", "synthesize.train_voices=[en-us, en+f4]",
           "synthesize.test_voices=[en-us+m3]", "s3.standin_units=16", "train.epochs=1", "train.batch_size=2",
           "train.d_model=32", "train.n_heads=2", "train.n_layers=1", "train.d_ff=64", "train.agg_layers=1",
           "train.warmup_steps=2", "train.val_speakers=1", "train.rvq_codebook_size=16", "train.rvq_levels=2",
           "train.finetune.taste_rvq.epochs=1", "train.finetune.taste_plain_rvq.epochs=1",
           "evaluate.attention_utterances=1", "evaluate.free_utterances=2", "evaluate.rebuild_utterances=2",
           "evaluate.listen_utterances=1"]
    results = tmp_path / "scaling.json"
    cmd = [sys.executable, str(root / "scripts/scaling_direct.py"), "--sizes", "6", "--seeds", "3", "--no-rebuild",
           "--whisper-pack", str(pack), "--tokenizer-json", str(whisper.embedded_model_dir() / "tokenizer.json"),
           "--work", str(tmp_path / "work"), "--results", str(results), *(x for s in toy for x in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(results.read_text())["runs"]
    assert (run["train_utterances"], run["seed"], run["runner"], run["rebuilt_speech"]) == (6, 3, "direct", False)
    assert run["sets"] == [*toy, "whisper.model=tiny.en-fp16"] and "not S3" in run["targets"]
    assert run["precision"] in ("bfloat16", "float32")
    mod = load_script("scripts/scaling.py")
    assert set(mod.shares(run["metrics"])) == {v for _, v, _ in mod.SERIES}  # every series, no WER without rebuilt speech
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "skipped" in again.stdout


def test_a_seed_in_another_precision_is_its_own_row(tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/scaling.py")
    results = _results(tmp_path / "scaling.json", sizes=(250, 1000), seeds=(1, 2))
    data = json.loads(results.read_text())
    data["runs"].append({**data["runs"][0], "precision": "float32", "machine": "another CPU"})
    results.write_text(json.dumps(data))
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--report-only", "--results", str(results), "--csv",
                                      str(tmp_path / "s.csv"), "--png", str(tmp_path / "s.png")])
    mod.main()
    summary, per_run = capsys.readouterr().out.split("\n\n")[:2]
    rows = [line for line in summary.splitlines() if line.startswith("| 250 |")]
    assert len(rows) == 2 and "| 1, 2 |" in rows[0] and "another CPU, float32" in rows[1] and "| 1 |" in rows[1]
    # The second table has every run on a line of its own: the same seed in two precisions twice.
    runs = [line for line in per_run.splitlines() if line.startswith("| 250 |")]
    assert len(runs) == 3 and sum(line.startswith("| 250 | 1 |") for line in runs) == 2
