"""The real rebuild path: scripts/cosyvoice_rebuild.py (run in a CosyVoice checkout: CosyVoice ships no
installable package, so its model here is a stand-in object with CosyVoiceModel's token2wav interface)
and the scoring of its output in this environment (rebuild.score_folder)."""

import json

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from conftest import load_script
from taste_pipeline import audio, rebuild, tables


def _script():
    return load_script("scripts/cosyvoice_rebuild.py")


def _units_table(path, targets, rows):
    t = pa.Table.from_pydict({"utt_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                              "units": [list(r[2]) for r in rows]}, schema=tables.FREE_UNITS)
    meta = {"targets": targets, "free_top_k": "25", "seed": "1", "test_manifest": "m.parquet"}
    tables.write_table(path, t, tables.FREE_UNITS, meta)


def _speaker_table(path, utts, width):
    emb = np.random.default_rng(0).standard_normal((len(utts), width)).astype(np.float32)
    t = pa.Table.from_pydict({"utt_id": utts, "emb": list(emb)}, schema=tables.speaker_schema(width))
    tables.write_table(path, t, tables.speaker_schema(width), {"speaker.source": "modelscope:iic/CosyVoice-300M"})


class FakeCosyVoiceModel:
    """CosyVoiceModel's state and token2wav signature; 22,050 Hz audio of 441 samples per 50 Hz unit."""

    def __init__(self):
        self.hift_cache_dict, self.mel_overlap_dict, self.flow_cache_dict, self.calls = {}, {}, {}, []

    def token2wav(self, token, prompt_token, prompt_feat, embedding, uuid, finalize=False, speed=1.0):
        import torch

        assert uuid in self.hift_cache_dict and self.flow_cache_dict[uuid].shape == (1, 80, 0, 2)
        self.calls.append({"token": token.shape, "prompt": (prompt_token.shape, prompt_feat.shape),
                           "embedding": embedding.shape, "finalize": finalize})
        return torch.full((1, token.shape[1] * 441), 0.1)


def test_the_script_refuses_what_cosyvoice_cannot_read(tmp_path):
    mod = _script()
    _units_table(tmp_path / "u.parquet", "standin-kmeans128-whisper-tiny.en-block3-cmvn", [("a", "taste", [1, 2])])
    _speaker_table(tmp_path / "s.parquet", ["a"], 192)
    with pytest.raises(SystemExit, match="not S3"):
        mod.read_inputs(tmp_path / "u.parquet", tmp_path / "s.parquet")
    _units_table(tmp_path / "u.parquet", mod.S3_TARGETS, [("a", "taste", [1, 2]), ("b", "taste", [3])])
    _speaker_table(tmp_path / "s256.parquet", ["a", "b"], 256)
    with pytest.raises(SystemExit, match="256-d embeddings from modelscope"):
        mod.read_inputs(tmp_path / "u.parquet", tmp_path / "s256.parquet")
    with pytest.raises(SystemExit, match=r"no embedding for \['b'\]"):
        mod.read_inputs(tmp_path / "u.parquet", tmp_path / "s.parquet")


def test_the_script_drives_token2wav_per_utterance_without_a_prompt(tmp_path):
    mod = _script()
    rows = [("a", "true_units", [1, 2, 3]), ("a", "taste", [4, 5]), ("a", "text_only", [])]
    _units_table(tmp_path / "u.parquet", mod.S3_TARGETS, rows)
    _speaker_table(tmp_path / "s.parquet", ["a"], 192)
    got, emb = mod.read_inputs(tmp_path / "u.parquet", tmp_path / "s.parquet")
    model = FakeCosyVoiceModel()
    index = mod.rebuild_all(got, emb, model, 22050, tmp_path / "out")
    assert [c["token"] for c in model.calls] == [(1, 3), (1, 2)]  # no call for the empty one
    assert all(c["embedding"] == (1, 192) and c["finalize"] and c["prompt"] == ((1, 0), (1, 0, 80)) for c in model.calls)
    assert not (model.hift_cache_dict or model.mel_overlap_dict or model.flow_cache_dict)  # caches dropped
    assert [r["file"] for r in index] == ["a/true_units.wav", "a/taste.wav", None]
    info = sf.info(str(tmp_path / "out/a/true_units.wav"))
    assert info.samplerate == 22050 and info.frames == 3 * 441
    assert json.loads((tmp_path / "out/index.json").read_text())["rows"] == index


def test_rebuilt_audio_is_scored_as_evaluate_scores_its_own(tiny_tables, tmp_path):
    manifest = tiny_tables["manifest_path"]
    rows = tables.read_manifest(manifest).to_pylist()[:3]
    index = []
    for r in rows:
        wav = audio.load_utterance(manifest.parent, r)
        for source, x in (("true_units", wav), ("taste", wav), ("text_only", np.zeros(0, np.float32))):
            entry = {"utt_id": r["utt_id"], "source": source, "file": None, "seconds": 0.0}
            if len(x):
                entry["file"] = f"{r['utt_id']}/{source}.wav"
                (tmp_path / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(tmp_path / entry["file"]), audio.resample(x, 16000, 22050), 22050)
            index.append(entry)
    (tmp_path / "index.json").write_text(json.dumps({"sample_rate": 22050, "rows": index}))
    s = rebuild.score_folder(tmp_path, manifest, tiny_tables["speaker_path"], asr_window_s=10)
    assert set(s) == {"original", "true_units", "taste", "text_only"}
    # The original audio through 22.05 kHz and back: the same words and voice as the original.
    assert s["true_units"]["wer"] == pytest.approx(s["original"]["wer"], abs=0.1)
    assert s["true_units"]["speaker_sim"] > 0.95 and s["true_units"]["duration_corr"] > 0.99
    assert s["text_only"]["wer"] == 1.0 and np.isnan(s["text_only"]["speaker_sim"])  # no audio: every word missed
    assert s["taste"]["wer_gap_closed"] == pytest.approx(1.0)
    index[-1]["utt_id"] = "nobody"
    (tmp_path / "index.json").write_text(json.dumps({"sample_rate": 22050, "rows": index}))
    with pytest.raises(ValueError, match=r"utterances \['nobody'\] are not in"):
        rebuild.score_folder(tmp_path, manifest, tiny_tables["speaker_path"])
