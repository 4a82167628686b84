"""Shared fixtures: a tiny espeak corpus made once per test session, and the embedded Whisper."""

from __future__ import annotations

from pathlib import Path

import pytest

from taste_pipeline import audio, corpus, whisper

TRAIN_VOICES = ["en-us", "en-us+m3"]
TEST_VOICES = ["en-gb-x-rp+m5"]


def make_corpus(out: Path, train: int = 8, test: int = 4, seed: int = 7) -> Path:
    corpus.synthesize(out, "tiny-train", "tiny-test", train, test, TRAIN_VOICES, TEST_VOICES,
                      chapters_per_speaker=2, pause_prob=0.2, max_pause_ms=500, seed=seed)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "LibriSpeech")


@pytest.fixture(scope="session")
def tiny_resampled(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resampled") / "tiny-train"
    audio.resample_split(tiny_corpus / "tiny-train", out)
    return out


@pytest.fixture(scope="session")
def tiny_whisper():
    return whisper.load_model(whisper.EMBEDDED)
