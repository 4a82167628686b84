"""Smoke run of dvc.yaml itself: a copy of the repo with a tiny corpus goes through every stage."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from taste_pipeline import tables

pytestmark = pytest.mark.slow  # whole pipelines and torchrun: deselect with -m 'not slow'

ROOT = Path(__file__).parents[1]


def _run(cmd, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("dvc is not installed beside this Python")
    repo = tmp_path_factory.mktemp("repo")
    for item in ("dvc.yaml", "stages", "src", "scripts", "docs/results"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, repo / item)  # docs/results: plots dvc.yaml names
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    # The default engine (Kokoro), two train speakers and one test speaker.
    p["synthesize"].update(train_utterances=6, test_utterances=3, kokoro_train_speakers=2, kokoro_test_speakers=1)
    p["s3"].update(standin_units=16)
    p["train"].update(epochs=2, batch_size=2, d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, warmup_steps=2,
                      val_speakers=1, rvq_codebook_size=16, rvq_levels=2,
                      finetune={"taste_ft": {"speech": "tokens", "init": "text_only", "epochs": 1},
                                "taste_rvq": {"squeeze": "rvq", "init": "taste", "epochs": 1}},
                      device="auto")  # resolved in train and in evaluate (cpu here, cuda where there is one)
    p["s3"].update(device="auto")
    p["evaluate"].update(attention_utterances=1, free_utterances=2, rebuild_utterances=2, listen_utterances=1)
    p["vocoder"].update(d_model=16, n_layers=1, epochs=1, griffin_lim_iters=4)
    (repo / "params.yaml").write_text(yaml.safe_dump(p))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates dvc.yaml names
    # A user's clone has history; DVCLive and `dvc exp` need at least one commit.
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "init"], repo)
    _run(["dvc", "repro"], repo)
    return repo


def test_every_stage_writes_its_tables(repo):
    for split, n in (("sample-train", 6), ("sample-test", 3)):
        manifest = tables.read_manifest(repo / f"data/resampled/{split}/manifest.parquet")
        assert manifest.num_rows == n
        w = tables.read_whisper(repo / f"data/features/whisper/{split}.parquet")
        t = tables.read_text(repo / f"data/features/text/{split}.parquet")
        ids = manifest.column("utt_id").to_pylist()
        assert w.column("utt_id").to_pylist() == ids == t.column("utt_id").to_pylist()
        assert w.column("num_frames").to_pylist() == [tables.frames_for(s) for s in manifest.column("num_samples").to_pylist()]


def test_metrics_and_plots(repo):
    import json

    m = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("top1_acc", "change_top1_acc", "nll", "first_token_acc", "text_only_top1_acc",
                "text_only_change_top1_acc", "text_only_nll", "shuffled_speech_top1_acc",
                "shuffled_speech_change_top1_acc", "copy_prev_top1_acc"):
        assert 0 <= m[key] < 100, key
    assert m["num_utterances"] == 3 and "not S3" in m["targets"]
    assert 0 < m["taste_ft_nll"] < 100 and m["best_epoch"]["taste_ft"] == 0  # the finetuned variant, 1 epoch
    # The topline and what each variant gets of the gap between text alone and it.
    assert 0 < m["speech_frames_nll"] < 100
    for prefix in ("", "taste_ft_", "shuffled_speech_"):
        for k in ("gap_closed_nll", "gap_closed_top1_acc", "gap_closed_change_top1_acc", "speech_bits_per_s"):
            assert prefix + k in m, prefix + k
    assert m["speech_bits_per_s"] == pytest.approx((m["text_only_nll"] - m["nll"]) * 50 / 0.6931471805599453)
    assert m["gap_closed_nll"] == pytest.approx((m["text_only_nll"] - m["nll"]) / (m["text_only_nll"] - m["speech_frames_nll"]))
    # Every variant decodes in its utterance's voice; the leak control swaps in another utterance's of it.
    for prefix in ("", "text_only_", "speech_frames_", "taste_rvq_"):
        assert m[prefix + "speaker_swap_delta_nll"] == pytest.approx(m[prefix + "speaker_swap_nll"] - m[prefix + "nll"])
    # The aggregator's alignment against the corpus's true word timings, and the even spread's.
    assert m["align_utterances"] == 3 and m["align_skipped"] == 0
    for prefix in ("align_", "align_uniform_"):
        assert 0 <= m[prefix + "frame_acc"] <= 1 and m[prefix + "boundary_ms_median"] >= 0
    # Speech rebuilt from units: the transcriber's floor (the original audio), the vocoder's ceiling (the
    # true units) and every variant's free-running units, scored alike; the listening set as audio.
    assert m["rebuilt_utterances"] == 2 and 0 <= m["original_wer"]
    for prefix in ("true_units_", "", "text_only_", "speech_frames_", "taste_rvq_"):
        # A variant this small may say END at once: no audio, no voice to compare (null, never NaN).
        sim, corr = m[prefix + "rebuilt_speaker_sim"], m[prefix + "rebuilt_duration_corr"]
        assert m[prefix + "rebuilt_wer"] >= 0 and (sim is None or -1 <= sim <= 1), prefix
        assert corr is None or -1 <= corr <= 1, prefix
    assert m["true_units_rebuilt_speaker_sim"] is not None and m["true_units_rebuilt_duration_corr"] == pytest.approx(1)
    assert "rebuilt_wer_gap_closed" in m and "text_only_rebuilt_wer_gap_closed" not in m
    listen = json.loads((repo / "plots/listen/index.json").read_text())
    assert len(listen) == 1 and {e["source"] for e in listen[0]["sources"]} >= {"original", "true_units", "taste", "text_only"}
    import soundfile as sf

    for e in listen[0]["sources"]:
        info = sf.info(str(repo / "plots/listen" / e["file"]))
        assert info.samplerate == 16000 and info.frames / 16000 == pytest.approx(e["seconds"])
    # What each variant decoded, for rebuilding with another vocoder: every variant and the true units.
    free = tables.read_free_units(repo / "data/eval/free_units.parquet")
    assert free.schema.metadata[b"targets"].decode() == m["targets"]
    by_source = {}
    for u, src, units in zip(*(free.column(c).to_pylist() for c in ("utt_id", "source", "units"))):
        by_source.setdefault(src, {})[u] = units
    assert set(by_source) == {"true_units", "taste", "text_only", "speech_frames", "taste_ft", "taste_rvq"}
    assert all(len(v) == 2 for v in by_source.values())
    s3 = tables.read_s3(repo / "data/features/s3/sample-test.parquet")
    true = dict(zip(s3.column("utt_id").to_pylist(), s3.column("tokens").to_pylist()))
    assert all(true[u] == units for u, units in by_source["true_units"].items())
    assert len(list((repo / "plots/eval/units").glob("*.png"))) == 1
    for png in ("per_position.png", "loss_curves.png"):
        assert (repo / "plots/eval" / png).stat().st_size > 1000
    assert len(list((repo / "plots/eval/attention").glob("*.png"))) == 1
    # One column per system, as dvc.yaml's plot of it names them (DVC draws one series per column).
    rows = json.loads((repo / "plots/eval/per_position.json").read_text())
    import yaml

    declared = next(p for p in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
                    if isinstance(p, dict) and "Accuracy by position (test)" in p)
    assert set(declared["Accuracy by position (test)"]["y"]["plots/eval/per_position.json"]) <= set(rows[0])
    assert "eval.json" in _run(["dvc", "metrics", "show"], repo)
    _run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo)
    assert (repo / "plots_html" / "index.html").exists()
    assert (repo / "metrics/train/taste/plots/metrics/train/step_loss.tsv").exists()


def test_the_interactive_plots_draw_each_variant_in_its_own_colour(repo):
    """DVC's own template colours by revision: one purple for every variant. Ours: one colour per series,
    drawn by vega itself, and axes that say what they hold."""
    import json
    import re

    import vl_convert

    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo))["data"]
    variants = ["taste", "text_only", "speech_frames", "taste_ft", "taste_rvq"]
    for title in ("Training loss per step", "Validation NLL per epoch", "Accuracy by position (test)"):
        spec = plots[title][0]["content"]
        svg = vl_convert.vegalite_to_svg(spec)
        colours = set(re.findall(r'<path[^>]*aria-roledescription="line mark"[^>]*stroke="(#[0-9a-fA-F]{6})"', svg))
        series = 6 if title.startswith("Accuracy") else len(variants) - 1  # taste_ft is not declared in dvc.yaml
        assert len(colours) == series, (title, colours)
        assert spec["encoding"]["x"]["title"] != spec["encoding"]["x"]["field"]  # a label, not the column name
    legend = vl_convert.vegalite_to_svg(plots["Validation NLL per epoch"][0]["content"])
    for name in ("taste", "text_only", "speech_frames", "taste_rvq"):
        assert f">{name}<" in legend


def test_a_finetuned_variant_runs_after_the_one_it_starts_from(repo):
    dag = _run(["dvc", "dag", "--dot"], repo)
    assert '"train@text_only" -> "finetune@taste_ft"' in dag and '"finetune@taste_ft" -> "evaluate"' in dag
    log = (repo / "metrics/train/taste_ft/params.yaml").read_text()
    assert "init: text_only" in log and "speech: tokens" in log


def test_the_plots_page_works_offline_with_each_plot_once(repo):
    """scripts/plots_page.py: no script from the network; in headless Chromium (when installed) every
    vega plot draws, every PNG is shown once and every audio of the listening table loads, as long as its file."""
    import json
    import sys

    out = _run([sys.executable, "scripts/plots_page.py", "-o", "page"] + (["--check"] if _chromium() else []), repo)
    html = (repo / "page" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and 'src="http' not in html
    assert "vegaEmbed" in html
    sources = json.loads((repo / "plots/listen/index.json").read_text())[0]["sources"]
    assert html.count("<audio") == len(sources) and "listening table" in out
    for e in sources:
        assert (repo / "page/listen" / e["file"]).stat().st_size > 44
    if _chromium():
        assert "every plot drew, each PNG once, every audio loaded" in out, out


def _chromium():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_second_repro_does_nothing(repo):
    out = _run(["dvc", "repro"], repo)
    assert "Running stage" not in out
    assert "up to date" in _run(["dvc", "status"], repo)


def test_single_split_target(repo):
    out = _run(["dvc", "repro", "-f", "-s", "resample@sample-test"], repo)
    assert "Running stage 'resample@sample-test'" in out and "sample-train" not in out


def _digests(repo):
    import hashlib

    files = sorted((repo / "data").rglob("*.parquet")) + sorted((repo / "data").rglob("*.flac"))
    out = {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    out["metrics/eval.json"] = (repo / "metrics/eval.json").read_text()
    return out


def test_forced_rerun_gives_byte_identical_tables_and_the_same_metrics(repo):
    before = _digests(repo)
    assert any("features/whisper" in k for k in before) and any("features/s3" in k for k in before)
    # The test split's stages and evaluate: the train split's run the same code, and the trainings'
    # determinism is tests/test_train.py's (each at a fraction of the cost).
    stages = [s for s in _run(["dvc", "stage", "list", "--name-only"], repo).split()
              if s.endswith("@sample-test") or s == "evaluate"]
    out = _run(["dvc", "repro", "-f", "-s", *stages], repo)
    assert "Running stage 'whisper@sample-test'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'train@" not in out and "@sample-train'" not in out
    assert _digests(repo) == before


def test_experiment_with_a_new_variant_trains_only_it_and_is_listed(repo):
    """A variant added with -S (here text placed by the true word timings, which the train stage reads
    from the synthesize stage's table) trains alone; evaluate scores it beside the others."""
    import json

    out = _run(["dvc", "exp", "run", "-S", "+train.variants.text_oracle={speech: none, unit_alignment: oracle}",
                "--name", "oracle-test"], repo)
    assert "Running stage 'train@text_oracle'" in out and "Running stage 'train@taste'" not in out
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo))
    exps = [e for rev in shown for exp in (rev.get("experiments") or []) for e in exp.get("revs", [])]
    got = [e["data"]["params"]["params.yaml"]["data"]["train"]["variants"]["text_oracle"] for e in exps
           if e.get("name") == "oracle-test"]
    assert got == [{"speech": "none", "unit_alignment": "oracle"}]
    m = json.loads((repo / "metrics/eval.json").read_text())
    assert m["text_oracle_nll"] > 0 and "text_oracle_gap_closed_nll" in m and "text_only_gap_closed_nll" not in m
    assert "Running stage 'train@taste'" not in _run(["dvc", "repro"], repo)  # the workspace holds the exp's result


def test_tokenize_tables_and_the_quantizer_metrics(repo):
    import json

    for split in ("sample-train", "sample-test"):
        codes = tables.read_codes(repo / f"data/features/taste/{split}.parquet")
        manifest = tables.read_manifest(repo / f"data/resampled/{split}/manifest.parquet")
        assert codes.column("utt_id").to_pylist() == manifest.column("utt_id").to_pylist()
        assert codes.schema.field("codes").type.value_type.list_size == 2
    m = json.loads((repo / "metrics/eval.json").read_text())
    assert m["taste_rvq_bits_per_token"] == 2 * 4
    assert m["taste_rvq_bitrate_bps"] == pytest.approx(8 * m["text_tokens_per_s"])
    assert 0 <= m["taste_rvq_dead_code_share"] < 1 and 1 <= m["taste_rvq_codebook_perplexity_l1"] <= 16
    for prefix in ("", "text_only_", "speech_frames_", "taste_rvq_"):
        assert m[f"{prefix}free_uer"] >= 0 and 0 <= m[f"{prefix}free_no_end"] <= 1, prefix
    assert "taste_rvq_gap_closed_nll" in m and m["free_utterances"] == 2
    dag = _run(["dvc", "dag", "--dot"], repo)
    assert '"finetune@taste_rvq" -> "tokenize@sample-train"' in dag and '"tokenize@sample-train" -> "evaluate"' in dag


def test_the_api_and_cli_round_trip_on_an_utterance_the_pipeline_never_saw(repo, tmp_path):
    """A sentence and a voice in neither split, at 22.05 kHz stereo: encode -> codes -> decode -> units."""
    import json

    import numpy as np
    import soundfile as sf

    from taste_pipeline import corpus
    from taste_pipeline.tokenizer import TasteTokenizer

    engine = corpus.Espeak()
    engine.set_voice("en-gb-scotland")  # not among the fixture's voices
    text = "the purple kettle whispered to a sleepy lighthouse"
    mono = engine.synth(text, 170, 50, 50)[0].astype(np.float32) / 32768
    wav = tmp_path / "new.wav"
    sf.write(wav, np.stack([mono, mono * 0.5], axis=1), engine.sample_rate)
    seen = tables.read_manifest(repo / "data/resampled/sample-train/manifest.parquet").column("text").to_pylist()
    assert text.upper() not in seen
    tok = TasteTokenizer.load(repo / "models/taste_rvq")
    codes = tok.encode(wav, text)
    assert codes.shape == (len(tok.text_tokens(text)), 2) and codes.min() >= 0 and codes.max() < 16
    units = tok.decode(codes, text, max_units=300, speaker=wav)  # in the voice of the speech it encoded
    assert 0 < len(units) <= 300
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    enc = subprocess.run([sys.executable, "-m", "taste_pipeline.tokenizer", "encode", "--model", "models/taste_rvq",
                          str(wav), text], cwd=repo, env=env, capture_output=True, text=True, check=True)
    out = json.loads(enc.stdout)
    assert out["codes"] == codes.tolist()
    dec = subprocess.run([sys.executable, "-m", "taste_pipeline.tokenizer", "decode", "--model", "models/taste_rvq",
                          "--codes", enc.stdout, "--max-units", "300", text], cwd=repo, env=env, capture_output=True,
                         text=True, check=True)
    assert json.loads(dec.stdout)["units"] == units
