"""Shared fixtures, made once per test session: a tiny espeak corpus, its resampled train split, the
embedded Whisper, and the split's whisper / text / stand-in target / speaker tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from taste_pipeline import audio, corpus, whisper

TRAIN_VOICES = ["en-us", "en-us+m3"]
TEST_VOICES = ["en-gb-x-rp+m5"]


def pytest_collection_modifyitems(items):
    """The tiny pipeline's file first (a stable sort): it is the longest, and under
    ``pytest -n auto --dist loadfile`` (make test) the other files then run beside it, not after it."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")


def make_corpus(out: Path, train: int = 8, test: int = 4, seed: int = 7) -> Path:
    corpus.synthesize(out, "tiny-train", "tiny-test", train, test, TRAIN_VOICES, TEST_VOICES,
                      chapters_per_speaker=2, pause_prob=0.2, max_pause_ms=500, seed=seed, words_dir=out.parent / "words")
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


@pytest.fixture(scope="session")
def tiny_tables(tiny_resampled, tmp_path_factory) -> dict[str, Path]:
    """The tables the train stage joins, for the tiny train split (8 stand-in units)."""
    from taste_pipeline import params, s3, speaker, text

    out = tmp_path_factory.mktemp("tables")
    m = tiny_resampled / "manifest.parquet"
    whisper.extract_split(m, out / "w.parquet", params.Whisper(batch_size=4, rows_per_group=8))
    text.extract_split(m, out / "t.parquet", whisper.EMBEDDED, "lower")
    s3.prepare_tokenizer(s3.STANDIN, out / "tok", m, 8, 0)
    s3.tokenize_split(m, out / "tok", out / "s.parquet")
    speaker.embed_split(m, out / "spk.parquet", speaker.RESEMBLYZER)
    return {"manifest_path": m, "whisper_path": out / "w.parquet", "text_path": out / "t.parquet",
            "s3_path": out / "s.parquet", "speaker_path": out / "spk.parquet"}


def assert_parallel_split(src: Path, words: Path, texts: list[str]) -> None:
    """A parallel split (``corpus.parallel``, ``kokoro.parallel``): two speakers say every text, and the
    word timings table has a row per utterance."""
    from taste_pipeline import tables

    said: dict[str, list[str]] = {}
    for f in sorted(src.rglob("*.trans.txt")):
        for line in f.read_text().splitlines():
            utt, text = line.split(" ", 1)
            said.setdefault(text.lower(), []).append(utt.split("-")[0])
    assert sorted(said) == sorted(texts) and all(len(set(v)) == 2 for v in said.values())
    w = tables.read_words(words)
    assert w.num_rows == 2 * len(texts)
    assert sorted(" ".join(x) for x in w.column("words").to_pylist()) == sorted(texts * 2)


def load_script(path: str):
    """A script of the repo (``scripts/x.py``, ``bench/x.py``) as a module, without running its main."""
    import importlib.util

    full = Path(__file__).parents[1] / path
    spec = importlib.util.spec_from_file_location(full.stem, full)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
