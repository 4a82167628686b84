"""Scoring rebuilt speech: the WER normalisation, duration correlation, and the offline transcriber."""

import numpy as np
import pytest

from taste_pipeline import rebuild


def test_wer_normalises_both_sides_alike():
    assert rebuild.wer(["THE CAT SAT ON THE MAT"], ["The cat sat on the mat."]) == 0.0
    assert rebuild.wer(["he said twenty five"], ["He said 25!"]) == 0.0  # Whisper's normaliser: numbers
    assert rebuild.wer(["the cat sat"], ["the cat"]) == pytest.approx(1 / 3)
    # Over a set: errors / reference words, not a mean of per-utterance rates.
    assert rebuild.wer(["a b c d", "e f"], ["a b c d", "x"]) == pytest.approx(2 / 6)
    assert rebuild.wer(["a b"], ["a b c d"]) == pytest.approx(1.0)  # insertions can pass 100 %
    with pytest.raises(ValueError, match="empty after normalisation"):
        rebuild.wer(["?!"], ["a"])


def test_duration_correlation():
    assert rebuild.duration_corr([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert rebuild.duration_corr([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert np.isnan(rebuild.duration_corr([2, 2, 2], [1, 2, 3]))


def test_the_wheel_transcriber_hears_espeak(tmp_path):
    """The offline Whisper tiny.en through CTranslate2 on a synthesized sentence of common words."""
    from taste_pipeline import audio, corpus

    engine = corpus.Espeak()
    engine.set_voice("en-us")
    samples, _ = engine.synth("<speak>the cat sat on the mat</speak>", 150, 50, 50)
    t = rebuild.Transcriber()
    text = t(audio.resample(samples.astype(np.float32) / 32768, engine.sample_rate))
    assert rebuild.wer(["the cat sat on the mat"], [text]) <= 0.34, text
    # The same sentence read through a 10 s window instead of Whisper's 30 s.
    assert rebuild.wer(["the cat sat on the mat"], [rebuild.Transcriber(window_s=10)(audio.resample(
        samples.astype(np.float32) / 32768, engine.sample_rate))]) <= 0.34
    assert t(np.zeros(0, np.float32)) == ""


def test_an_asr_model_that_is_not_a_ct2_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="evaluate.asr_model"):
        rebuild.ct2_dir(str(tmp_path))
