"""Where the aggregator puts each text token, against where its word really is.

The embedded corpus knows every word's true start and end (espeak-ng reports them while it speaks: the
synthesize stage's words table). The aggregator's value layer says, for each 20 ms Whisper frame,
which text token reads it most; through the token's word, each frame gets a predicted word. Scores:

- ``frame_acc``: the share of frames inside a word whose predicted word is that word (frames in
  silence between words are not scored).
- ``boundary_ms``: per word, |first frame given to it - its true start| in ms; words given no frame
  count in ``words_missed``.

Words that espeak spoke as one (they share a span in the table, e.g. "in the") count as one word.

The same scores for tokens spread evenly over the utterance (``uniform_*``) say what the attention adds
over knowing only the text and the duration.
"""

from __future__ import annotations

import numpy as np

FRAME_S = 0.02  # one Whisper frame (and one target unit)


def token_words(pieces: list[str]) -> np.ndarray:
    """(L,) the word index of each text token: a token whose text starts with a space begins a new word
    (Whisper's byte-level BPE marks word starts that way; the first token starts word 0)."""
    word, out = -1, []
    for k, piece in enumerate(pieces):
        if k == 0 or piece.startswith(" "):
            word += 1
        out.append(word)
    return np.asarray(out)


def spoken_words(starts: np.ndarray) -> np.ndarray:
    """(W,) each word's spoken word: words that share a start (spoken as one) get one index."""
    starts = np.asarray(starts)
    return np.cumsum(np.r_[True, np.diff(starts) > 0]) - 1 if len(starts) else np.zeros(0, int)


def frame_words(starts: np.ndarray, ends: np.ndarray, num_frames: int) -> np.ndarray:
    """(F,) the true word of each frame (its centre inside [start, end)), -1 outside every word."""
    centre = (np.arange(num_frames) + 0.5) * FRAME_S
    out = np.full(num_frames, -1)
    for k, (s, e) in enumerate(zip(starts, ends)):
        out[(centre >= s) & (centre < e)] = k
    return out


def uniform_tokens(num_tokens: int, num_frames: int) -> np.ndarray:
    """(F,) tokens spread evenly over the frames: the alignment that knows only the text and the length."""
    return np.minimum((np.arange(num_frames) * num_tokens) // max(1, num_frames), num_tokens - 1)


def score(frame_token: np.ndarray, tok_word: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict:
    """One utterance: counts and boundary errors (see the module doc), from ``frame_token`` (F,), the
    token each frame is given, and ``tok_word`` (L,), each token's word."""
    spoken = spoken_words(starts)
    first = np.unique(spoken, return_index=True)[1]
    starts, ends = np.asarray(starts)[first], np.asarray(ends)[first]
    truth = frame_words(starts, ends, len(frame_token))
    said = spoken[tok_word[frame_token]]
    inside = truth >= 0
    errors, missed = [], 0
    for k, s in enumerate(starts):
        frames = np.nonzero(said == k)[0]
        if len(frames):
            errors.append(abs(frames[0] * FRAME_S - s) * 1000)
        else:
            missed += 1
    return {"right": int((said[inside] == truth[inside]).sum()), "frames": int(inside.sum()),
            "boundary_ms": errors, "missed": missed, "words": len(starts)}


def summarize(items: list[dict], prefix: str = "") -> dict:
    """Scores over utterances: frame_acc, boundary_ms_mean / _median, words_missed (a share)."""
    errors = np.concatenate([np.asarray(i["boundary_ms"], float) for i in items]) if items else np.zeros(0)
    frames = sum(i["frames"] for i in items)
    return {f"{prefix}frame_acc": sum(i["right"] for i in items) / frames if frames else float("nan"),
            f"{prefix}boundary_ms_mean": float(errors.mean()) if len(errors) else float("nan"),
            f"{prefix}boundary_ms_median": float(np.median(errors)) if len(errors) else float("nan"),
            f"{prefix}words_missed": sum(i["missed"] for i in items) / max(1, sum(i["words"] for i in items))}


def token_durations(pieces: list[str], starts: np.ndarray, num_frames: int) -> np.ndarray:
    """(L,) each text token's true duration in frames, the tokens laid end to end over ``num_frames``:
    a spoken word (words spoken as one share theirs) runs from its start to the next one's, the first
    from frame 0 (leading silence and pauses go to the token before), and is split over its tokens in
    proportion to their characters. The oracle the ``oracle`` unit alignment reads."""
    tok_word = token_words(pieces)
    spoken = spoken_words(np.asarray(starts))
    if len(pieces) == 0 or tok_word[-1] + 1 != len(spoken):
        raise ValueError(f"{len(pieces)} tokens make {tok_word[-1] + 1 if len(pieces) else 0} words; "
                         f"the timings have {len(spoken)}")
    group = spoken[tok_word]  # the spoken word of each token
    first = np.unique(spoken, return_index=True)[1]
    begin = np.round(np.asarray(starts, np.float64)[first] / FRAME_S).astype(np.int64)
    begin[0] = 0
    bounds = np.minimum(np.r_[begin, num_frames], num_frames)
    bounds = np.maximum.accumulate(bounds)
    chars = np.asarray([max(1, len(p.strip())) for p in pieces], np.float64)
    ends = np.zeros(len(pieces), np.int64)
    for g in range(len(first)):
        mine = np.nonzero(group == g)[0]
        share = np.cumsum(chars[mine]) / chars[mine].sum()
        ends[mine] = bounds[g] + np.round(share * (bounds[g + 1] - bounds[g])).astype(np.int64)
    return np.diff(np.r_[0, ends])
