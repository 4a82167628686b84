"""Scoring the aggregator's alignment against true word timings (``alignment``)."""

import numpy as np
import pytest

from taste_pipeline import alignment


def test_tokens_map_to_words_by_their_leading_space():
    assert alignment.token_words(["the", " whisper", "ed", " word", "s"]).tolist() == [0, 1, 1, 2, 2]


def test_frames_on_the_right_word_and_boundaries_in_ms():
    # Words: [0, 0.1) [0.2, 0.3); frames of 20 ms; tokens: 0 -> word 0, 1 and 2 -> word 1.
    starts, ends = np.array([0.0, 0.2]), np.array([0.1, 0.3])
    tok_word = np.array([0, 1, 1])
    frame_token = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # word 1 from frame 3 (60 ms): 140 ms early
    s = alignment.score(frame_token, tok_word, starts, ends)
    # 10 frames (200 ms): only word 0's frames 0-4 lie inside a word (5-9 are silence); 0-2 are given
    # word 0, 3-4 word 1.
    assert (s["right"], s["frames"]) == (3, 5)
    assert s["boundary_ms"] == pytest.approx([0.0, 140.0]) and s["missed"] == 0
    got = alignment.summarize([s], "a_")
    assert got["a_frame_acc"] == pytest.approx(0.6) and got["a_boundary_ms_median"] == pytest.approx(70.0)


def test_words_spoken_as_one_count_as_one():
    """espeak joins some pairs ("in the"): they share a span, and a frame given to either is right."""
    starts, ends = np.array([0.0, 0.0, 0.1]), np.array([0.1, 0.1, 0.2])
    assert alignment.spoken_words(starts).tolist() == [0, 0, 1]
    frame_token = np.array([1, 1, 0, 0, 0, 2, 2, 2, 2, 2])  # tokens of "in", "the", "morning"
    s = alignment.score(frame_token, np.array([0, 1, 2]), starts, ends)
    assert (s["right"], s["frames"], s["words"], s["missed"]) == (10, 10, 2, 0)


def test_an_even_spread_covers_every_token_in_order():
    u = alignment.uniform_tokens(3, 10)
    assert u.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] and alignment.uniform_tokens(4, 2).tolist() == [0, 2]


def test_true_durations_cover_the_frames_and_start_each_word_where_it_is_spoken():
    pieces = [" the", " cat", " sl", "ept", " in", " the", " house"]
    starts = np.array([0.1, 0.5, 0.9, 1.3, 1.3, 1.5])  # "in the" spoken as one
    d = alignment.token_durations(pieces, starts, 100)
    assert d.sum() == 100 and (d >= 0).all()
    begin = np.r_[0, np.cumsum(d)[:-1]]
    # Each word's first token starts at the word's frame (the first at 0: leading silence is its own).
    assert begin[[1, 2, 4, 6]].tolist() == [25, 45, 65, 75]
    assert d[2] < d[3]  # split by characters: "sl" gets less than "ept"
    with pytest.raises(ValueError, match="7 tokens make 6 words; the timings have 5"):
        alignment.token_durations(pieces, starts[:5] + np.arange(5), 100)
