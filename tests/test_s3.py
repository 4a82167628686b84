import json

import numpy as np
import pytest
import torch

from taste_pipeline import audio, s3, tables, whisper


@pytest.fixture(scope="module")
def speech(tiny_resampled):
    rows = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()
    return [audio.load_utterance(tiny_resampled, r) for r in rows]


def test_real_s3_path_runs_batched_with_random_weights(speech):
    """Batched and one-at-a-time codes agree (s3tokenizer's own test allows 0.2 % apart); the codebook is
    filled with the states' own frames (an untrained one is all zeros, whose every code is 0 and would
    prove nothing)."""
    torch.manual_seed(0)
    tok = s3.S3Tokens(None, batch_size=3)
    hidden = torch.cat(tok.hidden(speech[:4]))  # codebook entries where the states are
    with torch.no_grad():
        pick = torch.randint(0, len(hidden), (4096,), generator=torch.Generator().manual_seed(0))
        tok.model.quantizer._codebook.embed.copy_(torch.nn.functional.normalize(hidden[pick], dim=-1))  # as x is
    batched = tok.tokenize(speech[:4])
    tok.batch_size = 1
    single = tok.tokenize(speech[:4])
    for a, b, x in zip(batched, single, speech):
        assert len(a) == len(b) and abs(len(a) - tables.frames_for(len(x))) <= 1
        assert len(set(a.tolist())) > 5  # codes that vary
        assert np.mean(a != b) <= 0.002
    assert tok.vocab_size == 4096 and tok.name == s3.S3_NAME


def test_s3_batches_by_length_and_keeps_input_order(speech):
    torch.manual_seed(0)
    tok = s3.S3Tokens(None, batch_size=3)
    audios = [speech[2], speech[0][:8000], speech[1], speech[3][:20000]]
    batched = tok.hidden(audios)
    tok.batch_size = 1
    for h, a, single in zip(batched, audios, tok.hidden(audios)):
        assert h.shape == single.shape and h.shape[1] == 1280
        assert abs(h.shape[0] - tables.frames_for(len(a))) <= 1  # s3 counts frames from n // 160 mel frames
        torch.testing.assert_close(h, single, atol=2e-3, rtol=1e-3)


def test_s3_bfloat16_encoder_stays_faithful_and_long_audio_is_tokenized(speech):
    torch.manual_seed(0)
    ref = s3.S3Tokens(None, batch_size=4)
    bf = s3.S3Tokens(None, batch_size=4, dtype="bfloat16")
    bf.model.load_state_dict(ref.model.state_dict())
    bf.encoder.load_state_dict(ref.model.encoder.state_dict())
    for a, b in zip(ref.hidden(speech[:3]), bf.hidden(speech[:3])):
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.99
    long_ = np.tile(speech[0], 1 + 31 * 16000 // len(speech[0]))[: 31 * 16000]  # over the 30 s window
    codes = ref.tokenize([speech[1], long_])
    assert abs(len(codes[1]) - tables.frames_for(len(long_))) <= 1
    assert abs(len(codes[0]) - tables.frames_for(len(speech[1]))) <= 1
    with pytest.raises(ValueError, match="s3.dtype"):
        s3.S3Tokens(None, dtype="int4")


def test_fetch_asks_modelscope_for_cosyvoice(monkeypatch, tmp_path):
    calls = {}

    def fake_download(model_id, allow_patterns=None, **kw):
        calls.update(model_id=model_id, allow_patterns=allow_patterns)
        folder = tmp_path / "ms"
        folder.mkdir()
        (folder / s3.S3_FILE).write_bytes(b"onnx")
        return str(folder)

    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", fake_download)
    path = s3.fetch("modelscope:iic/CosyVoice-300M", tmp_path / "out")
    assert calls == {"model_id": "iic/CosyVoice-300M", "allow_patterns": [s3.S3_FILE]}
    assert path.read_bytes() == b"onnx"
    with pytest.raises(FileNotFoundError, match="s3.source"):
        s3.fetch(str(tmp_path / "missing.onnx"), tmp_path / "out2")


def test_standin_units_depend_on_audio_and_are_deterministic(speech):
    a = s3.StandinUnits.fit(speech, 16, seed=1)
    b = s3.StandinUnits.fit(speech, 16, seed=1)
    ta, tb = a.tokenize(speech), b.tokenize(speech)
    for x, u, v in zip(speech, ta, tb):
        assert len(u) == tables.frames_for(len(x)) and np.array_equal(u, v)
        assert u.min() >= 0 and u.max() < 16
    assert len(set(np.concatenate(ta).tolist())) > 8  # not a constant
    silence = a.tokenize([np.zeros(16000, np.float32)])[0]
    assert len(set(silence.tolist())) == 1 and not np.array_equal(silence, ta[0][:50])
    assert "S3" not in a.name.replace("(not S3)", "")


def test_stages_write_named_targets(tiny_resampled, tmp_path):
    info = s3.prepare_tokenizer(s3.STANDIN, tmp_path / "tok", tiny_resampled / "manifest.parquet", 8, 0)
    assert json.loads((tmp_path / "tok" / s3.INFO_FILE).read_text())["kind"] == "standin"
    n = s3.tokenize_split(tiny_resampled / "manifest.parquet", tmp_path / "tok", tmp_path / "s3.parquet")
    table = tables.read_s3(tmp_path / "s3.parquet")
    assert n == table.num_rows == 8
    assert table.schema.metadata[b"targets"].decode() == info["name"] == s3.standin_name(8)


def test_the_split_a_standin_was_fitted_on_takes_its_units_from_the_fit(tiny_resampled, tmp_path, capsys):
    """The fit computed every feature of its split already: the s3 stage of that split (the same manifest)
    reuses the units, and its table is byte for byte the one computing them again gives."""
    import shutil

    m = tiny_resampled / "manifest.parquet"
    s3.prepare_tokenizer(s3.STANDIN, tmp_path / "tok", m, 8, 0)
    assert set(s3.fitted_units(tmp_path / "tok", m)) == set(tables.read_manifest(m).column("utt_id").to_pylist())
    s3.tokenize_split(m, tmp_path / "tok", tmp_path / "reused.parquet")
    assert "units come from the fit" in capsys.readouterr().out
    shutil.copytree(tmp_path / "tok", tmp_path / "bare")
    (tmp_path / "bare" / s3.FITTED_FILE).unlink()
    s3.tokenize_split(m, tmp_path / "bare", tmp_path / "computed.parquet")
    assert "units come from the fit" not in capsys.readouterr().out
    assert (tmp_path / "reused.parquet").read_bytes() == (tmp_path / "computed.parquet").read_bytes()
    # Another manifest (here: the same rows, other bytes) is tokenized from its audio.
    other = tmp_path / "other" / "manifest.parquet"
    other.parent.mkdir()
    t = tables.read_manifest(m)
    tables.write_table(other, t.replace_schema_metadata({**(t.schema.metadata or {}), b"note": b"x"}), t.schema)
    assert s3.fitted_units(tmp_path / "tok", other) is None


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.slow
@pytest.mark.parametrize("frames", ["None", "s3.WhisperLayer(whisper.EMBEDDED, 3)"])
def test_standin_targets_do_not_depend_on_the_cpu_kind(tiny_resampled, tmp_path, frames):
    """Fitted and applied under this CPU's torch kernels and under torch held to AVX2 (as on a CPU
    without AVX-512), the stand-in gives the same tokenizer file and the same units. (Where this CPU
    has only AVX2 both runs take the same path; the check bites on AVX-512 and AMX machines.)"""
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, torch\n"
        "from taste_pipeline import audio, s3, tables, whisper\n"
        "m = sys.argv[1]\n"
        "from pathlib import Path\n"
        "rows = tables.read_manifest(m).to_pylist()\n"
        "speech = [audio.load_utterance(Path(m).parent, r) for r in rows]\n"
        f"tok = s3.StandinUnits.fit(speech, 32, seed=7, frames={frames})\n"
        "tok.save(sys.argv[2] + '.safetensors')\n"
        "np.save(sys.argv[2] + '.npy', np.concatenate(tok.tokenize(speech)))\n"
        "print(torch.backends.cpu.get_cpu_capability())\n")
    runs = {}
    for name, env in (("native", {}), ("avx2", AVX2_ONLY)):
        r = subprocess.run([sys.executable, "-c", script, str(tiny_resampled / "manifest.parquet"), str(tmp_path / name)],
                           env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        runs[name] = r.stdout.strip()
    assert runs["avx2"] == "AVX2"
    assert np.array_equal(np.load(tmp_path / "native.npy"), np.load(tmp_path / "avx2.npy"))
    assert (tmp_path / "native.safetensors").read_bytes() == (tmp_path / "avx2.safetensors").read_bytes()


def test_standin_features_sit_on_the_grid_in_float64(speech):
    f = s3.standin_features(speech[0], "utterance")
    assert f.dtype == np.float64
    np.testing.assert_allclose(f / s3.FEATURE_GRID, np.round(f / s3.FEATURE_GRID), atol=1e-6)
    # the same features as s3tokenizer's float32 log-mel, up to float32 rounding and the grid
    ref = s3._cmvn(s3.pooled_log_mel(speech[0]))
    np.testing.assert_allclose(f, ref, atol=s3.FEATURE_GRID)
    mel32 = s3.log_mel(speech[0]).numpy()
    np.testing.assert_allclose(s3.log_mel64(speech[0]).numpy(), mel32, atol=2e-4)


def test_whisper_standin_is_deterministic_and_names_itself(speech, tmp_path):
    """Two fits give the same file and units; the saved file rebuilds the same tokenizer (its Whisper
    block included); units are a different kind from the log-mel stand-in's."""
    frames = s3.WhisperLayer(whisper.EMBEDDED, 3)
    a = s3.StandinUnits.fit(speech, 16, seed=1, frames=frames)
    b = s3.StandinUnits.fit(speech, 16, seed=1, frames=frames)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = s3.StandinUnits.load(tmp_path / "a.safetensors")
    assert isinstance(loaded.frames, s3.WhisperLayer) and loaded.frames.layer == 3
    units = a.tokenize(speech)
    for x, u, v in zip(speech, units, loaded.tokenize(speech)):
        assert len(u) == tables.frames_for(len(x)) and np.array_equal(u, v)
    assert len(set(np.concatenate(units).tolist())) > 8
    assert a.name == "standin-kmeans16-whisper-tiny.en-block3-cmvn (not S3)"
    logmel = s3.StandinUnits.fit(speech, 16, seed=1).tokenize(speech)
    assert not all(np.array_equal(u, v) for u, v in zip(units, logmel))
    with pytest.raises(ValueError, match="s3.standin_layer: 5"):
        s3.WhisperLayer(whisper.EMBEDDED, 5)
