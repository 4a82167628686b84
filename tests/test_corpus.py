import re
import subprocess
import sys

import pytest
import soundfile as sf

from conftest import TEST_VOICES, TRAIN_VOICES


def _lines(split_dir):
    out = {}
    for trans in split_dir.rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            out[utt] = (text, trans)
    return out


def test_layout_is_librispeech(tiny_corpus):
    for split, n in (("tiny-train", 8), ("tiny-test", 4)):
        lines = _lines(tiny_corpus / split)
        assert len(lines) == n
        for utt, (text, trans) in lines.items():
            spk, chap, idx = utt.split("-")
            assert re.fullmatch(r"\d{4}", idx)
            assert trans == tiny_corpus / split / spk / chap / f"{spk}-{chap}.trans.txt"
            assert text == text.upper() and text.strip()
            info = sf.info(trans.parent / f"{utt}.flac")
            assert info.samplerate == 22050 and info.channels == 1 and info.frames > 22050 // 2


def test_test_split_is_disjoint_from_train(tiny_corpus):
    train, test = _lines(tiny_corpus / "tiny-train"), _lines(tiny_corpus / "tiny-test")
    speakers = lambda lines: {u.split("-")[0] for u in lines}  # noqa: E731
    assert speakers(train).isdisjoint(speakers(test))
    assert len(speakers(train)) == len(TRAIN_VOICES) and len(speakers(test)) == len(TEST_VOICES)
    assert not {t for t, _ in train.values()} & {t for t, _ in test.values()}


@pytest.mark.slow
def test_two_runs_in_separate_processes_are_byte_identical(tmp_path):
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import make_corpus; "
            "from pathlib import Path; make_corpus(Path(sys.argv[1]) / 'LibriSpeech', train=6, test=2, seed=3)")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                       cwd=__import__("pathlib").Path(__file__).parents[1], capture_output=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    # 8 flac; transcripts: train 2 speakers x 2 chapters, test 1 x 2; a word timings table per split
    assert files_a == files_b and len(files_a) == 8 + 6 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_pauses_and_rate_vary_the_audio_not_the_text():
    import random

    from taste_pipeline import corpus

    spk = corpus.speakers(["en-us"], 100, random.Random(0))
    utts = corpus.plan(["one two three four five six seven eight"] * 40, spk, 1, random.Random(0), 0.3, 500)
    assert len({u.ssml for u in utts}) > 1 and len({u.rate for u in utts}) > 1
    assert all(u.text == "one two three four five six seven eight" for u in utts)
    assert any("<break" in u.ssml for u in utts)


def test_unknown_voice_is_a_clear_error(tmp_path):
    import pytest

    from taste_pipeline import corpus

    with pytest.raises(ValueError, match="no voice 'xx-nonexistent'"):
        corpus.synthesize(tmp_path, "a", "b", 2, 1, ["xx-nonexistent"], ["en-us"], 1, 0.1, 300, 0)


@pytest.mark.slow
def test_every_default_voice_is_reproducible_across_processes():
    """The same text in each params.yaml voice, synthesized in two processes, gives the same samples."""
    from pathlib import Path

    import yaml

    root = Path(__file__).parents[1]
    syn = yaml.safe_load((root / "params.yaml").read_text())["synthesize"]
    voices = syn["train_voices"] + syn["test_voices"]
    code = ("import sys, hashlib; from taste_pipeline import corpus; e = corpus.Espeak(); out = []\n"
            "for v in sys.argv[1:]:\n"
            "    e.set_voice(v); a = e.synth('<speak>a quiet <break time=\"150ms\"/> garden gate</speak>', 170, 50, 50)[0]\n"
            "    out.append(hashlib.md5(a.tobytes()).hexdigest())\n"
            "print(' '.join(out))")
    runs = [subprocess.run([sys.executable, "-c", code, *voices], check=True, capture_output=True, text=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_breath_noise_variants_are_refused(tmp_path):
    import pytest

    from taste_pipeline import corpus

    with pytest.raises(ValueError, match="breath noise"):
        corpus.synthesize(tmp_path, "a", "b", 2, 1, ["en-us+f2"], ["en-us"], 1, 0.1, 300, 0)


def test_word_timings_are_where_the_words_are_spoken(tiny_corpus):
    """espeak-ng's word events: every word of every transcript has a start and an end, and a word spoken
    after a silent break starts within 20 ms of where its audio rises out of the silence."""
    import numpy as np

    from taste_pipeline import corpus, tables

    for split in ("tiny-train", "tiny-test"):
        t = tables.read_words(tiny_corpus.parent / "words" / f"{split}.parquet")
        lines = _lines(tiny_corpus / split)
        assert sorted(t.column("utt_id").to_pylist()) == sorted(lines)
        for utt, words, end in zip(*(t.column(c).to_pylist() for c in ("utt_id", "words", "end"))):
            assert " ".join(words).upper() == lines[utt][0]
            assert end[-1] <= sf.info(lines[utt][1].parent / f"{utt}.flac").duration + 1e-6
    engine = corpus.Espeak()
    checked = 0
    for voice, rate in (("en-us", 150), ("en-gb-scotland", 200), ("en+f4", 120)):
        engine.set_voice(voice)
        ssml = '<speak>the quiet fisherman <break time="400ms"/> sold two wooden <break time="250ms"/> baskets</speak>'
        audio, events = engine.synth(ssml, rate, 50, 50)
        start, end = corpus.word_spans(audio, corpus.word_starts(ssml, events, voice), engine.sample_rate)
        assert len(start) == 7 and (np.diff(start) >= 0).all() and (end >= start).all()
        speech = np.abs(audio.astype(np.float64)) / 32768 > 10 ** (-35 / 20)  # well above any echo tail
        for k in (3, 6):  # the words after a break: where the audio rises out of the break's quiet
            lo = int((start[k] - 0.15) * engine.sample_rate)
            assert not speech[lo : int(start[k] * engine.sample_rate) - 200].any()
            onset = (lo + np.argmax(speech[lo:])) / engine.sample_rate
            assert abs(onset - start[k]) <= 0.020, (voice, k, onset, start[k])
            checked += 1
    assert checked == 6


def test_a_parallel_split_has_every_voice_say_every_text(tmp_path):
    from conftest import assert_parallel_split
    from taste_pipeline import corpus

    texts = ["the cat sat on a mat", "a dog ran far away from home"]
    corpus.parallel(tmp_path / "src", "par", texts, ["en-us", "en-us+m3"], 1, tmp_path / "words")
    assert_parallel_split(tmp_path / "src" / "par", tmp_path / "words" / "par.parquet", texts)


def test_the_splits_nest_whatever_the_train_size():
    """The test split, and the first N train utterances, are the same plan at every train size."""
    from taste_pipeline import corpus

    args = (["en-us", "en-us+m3", "en+f4"], ["en-gb-x-rp+m5", "en-us+f4"], 2, 0.3, 500, 11)
    plans = {n: corpus.plan_splits(n, 20, *args) for n in (7, 50, 200)}
    for n in (7, 50):
        assert plans[n][1] == plans[200][1]
        assert plans[n][0] == plans[200][0][:n]
    train, test = plans[200]
    assert len({u.utt_id for u in train}) == 200 and len({u.utt_id for u in test}) == 20
    assert not {u.text for u in train} & {u.text for u in test}
    # the seed is the corpus: another gives other sentences
    assert corpus.plan_splits(50, 20, *args[:-1], 12)[1] != plans[50][1]


def test_a_larger_corpus_keeps_the_smaller_ones_audio(tmp_path, monkeypatch):
    """espeak-ng carries state from call to call: the audio nests because the test split is spoken first
    and the train split in its plan's order, and does not depend on the workers because each block is
    spoken by a fresh process. With blocks of 2, a 3-utterance train split (one worker) and a
    5-utterance one (two workers) share their first 3 files byte for byte, the test split and the word
    timings."""
    import hashlib

    from taste_pipeline import corpus, tables

    monkeypatch.setattr(corpus, "BLOCK", 2)
    for n, workers in ((3, 1), (5, 2)):
        corpus.synthesize(tmp_path / str(n), "tr", "te", n, 3, TRAIN_VOICES, TEST_VOICES, 2, 0.3, 400, 5,
                          words_dir=tmp_path / f"words{n}", workers=workers)
    digest = lambda d: {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in d.rglob("*.flac")}  # noqa: E731
    small, large = digest(tmp_path / "3" / "tr"), digest(tmp_path / "5" / "tr")
    assert len(small) == 3 and len(large) == 5 and all(large[k] == v for k, v in small.items())
    assert digest(tmp_path / "3" / "te") == digest(tmp_path / "5" / "te")
    words = {n: tables.read_words(tmp_path / f"words{n}" / "tr.parquet").to_pylist() for n in (3, 5)}
    assert [r for r in words[5] if f"{r['utt_id']}.flac" in small] == words[3]
