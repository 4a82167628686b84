"""The embedded default corpus: generated sentences spoken by espeak-ng, written in LibriSpeech layout.

Everything here is offline and deterministic. espeak-ng comes as a shared library with its voice data
inside the PyPI package ``espeakng-loader`` and is driven through ctypes. The library's output is
byte-identical across processes for the same sequence of calls, but every call carries state into the
next (it survives ``espeak_Terminate``/``espeak_Initialize`` and the random seeds), so utterances are
spoken in blocks of ``BLOCK``, each by a fresh process (blocks run in parallel, and the audio is the
same for any number of them), in the plan's order within a block.

The splits nest: the test split is the first sentences drawn and is spoken first, the train split the
ones after, each with its own prosody draws, so the test split and the first N train utterances (texts,
prosody and audio) are the same whatever ``train_utterances`` is: what a scaling study needs.

Speech carries timing that text does not: every utterance gets its own speaking rate and pitch, and
silent breaks at random word boundaries that the transcript does not show.

espeak-ng also says where each word begins as it speaks (its word events carry the sample they start
at), so the corpus knows its true word timings: ``<words_dir>/<split>.parquet`` (tables.WORDS), the
reference the evaluate stage scores the aggregator's alignment against. espeak speaks some runs of
words as one ("in the", "for a"): they have one event between them, and share its span.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from .tables import atomic_path

# --------------------------------------------------------------------------------------------
# Sentences: a small generative grammar over a hand-picked vocabulary. Transcripts are ours, so
# there is no licence question, and the pool is large enough that train and test never share one.

_NOUNS = """
apple anchor arrow baker basket beach bell bench bird blanket boat book bottle bridge brother
buffalo button cabin camera candle canoe captain carpet castle cat chair chimney church city clock
cloud coat cottage council cow daughter desert doctor dog door dragon drawer engine farmer feather
fence field finger fire fisherman flag flower forest fountain garden gate ghost giant girl glass
governor guitar hammer harbor hat hill horse hunter island jacket judge kettle king kitchen knight
ladder lake lamp lantern lawyer letter lion machine map market meadow merchant mirror monkey
mountain musician needle nephew newspaper ocean officer orchard painter palace parrot pencil pilot
pocket poet prince prisoner queen rabbit river robot sailor scholar sheep shepherd shoe singer
soldier spider stone stranger student sword table teacher temple tower traveler tree village violin
wagon wall watchman whale widow window wizard wolf woman
""".split()

_ADJECTIVES = """
ancient angry bitter bold brave bright broken busy calm careful cheerful clever cold crooked
curious dark dusty eager early empty enormous faithful famous fierce foolish fragile gentle gloomy
golden graceful green grey heavy hidden hollow honest humble hungry icy idle jealous lazy little
lonely loud lucky modest muddy narrow nervous noble odd old pale patient polite proud quiet rapid
restless rich rough rusty sacred shallow sharp shy silent silver simple sleepy slow small smooth
soft solemn strange stubborn sudden tall tender thin tired tiny twisted violent warm wealthy weary
wet wicked wild wise wooden young
""".split()

_VERBS = """
admired avoided borrowed buried carried chased cleaned counted covered crossed defended described
discovered dropped examined filled followed forgot guarded hid ignored imitated inspected joined
kicked lifted locked measured mended noticed opened painted pulled pushed questioned raised
remembered repaired rescued returned robbed scolded searched selected shook signed sold stole
studied surrounded tested threw touched traded visited warned washed watched weighed wrapped
""".split()

_INTRANSITIVE = """
arrived laughed slept waited wandered whispered vanished trembled shouted smiled hesitated
collapsed departed listened paused rested sighed shivered stumbled sang
""".split()

_ADVERBS = """
quickly slowly quietly gladly suddenly carefully bravely softly angrily eagerly loudly rarely
silently happily gently barely nearly patiently proudly sadly secretly wisely
""".split()

_PREPOSITIONS = "above across after against along among around behind below beneath beside beyond by near over through toward under within without".split()

_NAMES = """
anna arthur beatrice charles clara david edith edward eleanor frank george grace harold helen
henry isabel james julia laura lewis margaret martha oliver peter rose samuel sarah thomas walter
william
""".split()

_CONJUNCTIONS = ["and", "but", "while", "because", "so", "although", "until", "before", "after"]
_OPENERS = ["at dawn", "that evening", "long ago", "in the morning", "by midnight", "once more",
            "without a word", "for a while", "in the end", "at last", "every winter", "the next day"]
_DETERMINERS = ["the", "the", "the", "a", "his", "her", "their", "that", "this", "every", "one"]


def _noun_phrase(rng: random.Random, depth: int = 0) -> list[str]:
    if rng.random() < 0.18:
        return [rng.choice(_NAMES)]
    words = [rng.choice(_DETERMINERS)]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        words.append(rng.choice(_ADJECTIVES))
    noun = rng.choice(_NOUNS)
    if words[0] in ("a", "one") and rng.random() < 0.3:
        words[0], noun = "two", noun + ("es" if noun.endswith(("s", "sh", "ch")) else "s")
    if words[0] == "a" and (words[1:] or [noun])[0][0] in "aeiou":
        words[0] = "an"
    words.append(noun)
    if depth == 0 and rng.random() < 0.25:
        words += [rng.choice(_PREPOSITIONS)] + _noun_phrase(rng, depth + 1)
    return words


def _clause(rng: random.Random) -> list[str]:
    subject = _noun_phrase(rng)
    if rng.random() < 0.25:
        verb = [rng.choice(_INTRANSITIVE)]
        rest = [rng.choice(_PREPOSITIONS)] + _noun_phrase(rng) if rng.random() < 0.6 else []
    else:
        verb = [rng.choice(_VERBS)]
        rest = _noun_phrase(rng)
        if rng.random() < 0.35:
            rest += [rng.choice(_PREPOSITIONS)] + _noun_phrase(rng, 1)
    if rng.random() < 0.3:
        verb = [rng.choice(_ADVERBS)] + verb if rng.random() < 0.5 else verb
        rest = rest + [rng.choice(_ADVERBS)] if rng.random() < 0.5 else rest
    return subject + verb + rest


def sentence(rng: random.Random) -> str:
    words = []
    if rng.random() < 0.2:
        words += rng.choice(_OPENERS).split()
    words += _clause(rng)
    while rng.random() < 0.4 and len(words) < 22:
        words += [rng.choice(_CONJUNCTIONS)] + _clause(rng)
    return " ".join(words)


def sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct sentences, deterministic for a seed."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        seen.setdefault(sentence(rng), None)
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could not generate {n} distinct sentences")
    return list(seen)


# --------------------------------------------------------------------------------------------
# espeak-ng through ctypes

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_SSML = 0x10
_RATE, _PITCH, _RANGE = 1, 3, 4


class _Event(ctypes.Structure):
    """espeak_EVENT (speak_lib.h); ``sample`` is where the event falls in this call's audio."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
# A word ends where its audio last rises above this level before the next word begins (espeak's breaks
# and the utterance's tail are digital silence; between words without a break the next start is the end).
WORD_END_DBFS = -60.0
_LEVEL_HOP_S = 0.005


class Espeak:
    """One espeak-ng instance: set a voice and prosody, then synthesize SSML to int16 samples."""

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._word_events: list[tuple[int, int]] = []

        def collect(wav, n, events):
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            i = 0
            while events and events[i].type != _EVENT_LIST_TERMINATED:
                if events[i].type == _EVENT_WORD:
                    self._word_events.append((events[i].text_position, events[i].sample))
                i += 1
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: the library holds a raw pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    def set_voice(self, name: str) -> None:
        if self._lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"synthesize: espeak-ng has no voice {name!r}")

    @staticmethod
    def check_reproducible(name: str) -> None:
        """Refuse voice variants with breath noise: their samples differ from process to process
        (measured: en-us+f2 and +f3 give other audio on every run), so the corpus would not be
        reproducible."""
        import espeakng_loader

        if "+" not in name:
            return
        variant = Path(espeakng_loader.get_data_path()) / "voices" / "!v" / name.split("+", 1)[1]
        if variant.is_file():
            for line in variant.read_text(errors="replace").splitlines():
                words = line.split()
                if words and words[0] == "breath" and any(w != "0" for w in words[1:]):
                    raise ValueError(f"synthesize: voice {name!r} adds espeak's breath noise, which is not "
                                     "reproducible across processes; pick a variant without it")

    def synth(self, ssml: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, np.ndarray]:
        """(int16 samples, (words spoken, 2): each spoken word's character position in ``ssml``, 1-based,
        and the sample it starts at)."""
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._word_events = [], []
        text = ssml.encode("utf-8")
        err = self._lib.espeak_Synth(text, len(text) + 1, 0, 0, 0, _CHARS_UTF8 | _SSML, None, None)
        self._lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng could not synthesize {ssml!r} (error {err})")
        return np.concatenate(self._chunks), np.asarray(self._word_events, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    voice: str
    rate: int  # words per minute, this speaker's habit
    pitch: int  # 0-100


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    speaker: Speaker
    chapter_id: str
    text: str  # transcript, lower case as generated
    ssml: str  # what is spoken: the words plus silent breaks
    rate: int
    pitch: int
    pitch_range: int


def speakers(voices: list[str], first_id: int, rng: random.Random) -> list[Speaker]:
    return [Speaker(str(first_id + i), v, rng.randint(140, 210), rng.randint(30, 70)) for i, v in enumerate(voices)]


def slot(k: int, spk: list, chapters_per_speaker: int) -> tuple:
    """(speaker, chapter id, utterance id) of a plan's ``k``-th sentence: speakers take sentences in turn,
    and each speaker's sentences go to its chapters in turn."""
    s = spk[k % len(spk)]
    j = k // len(spk)  # this speaker's j-th sentence
    chapter = str(int(s.speaker_id) * 10 + j % chapters_per_speaker)
    return s, chapter, f"{s.speaker_id}-{chapter}-{j // chapters_per_speaker:04d}"


def plan(texts: list[str], spk: list[Speaker], chapters_per_speaker: int, rng: random.Random,
         pause_prob: float, max_pause_ms: int) -> list[Utterance]:
    """Assign sentences to speakers round-robin and draw each utterance's prosody and pauses, in order,
    so the plan of the first N texts is the first N of any longer plan."""
    out = []
    for k, text in enumerate(texts):
        s, chapter, utt_id = slot(k, spk, chapters_per_speaker)
        words = text.split()
        spoken = [words[0]]
        for w in words[1:]:
            if rng.random() < pause_prob:
                spoken.append(f'<break time="{rng.randint(80, max_pause_ms)}ms"/>')
            spoken.append(w)
        out.append(Utterance(
            utt_id=utt_id, speaker=s, chapter_id=chapter,
            text=text, ssml="<speak>" + " ".join(spoken) + "</speak>",
            rate=int(np.clip(s.rate + rng.randint(-35, 35), 90, 260)),
            pitch=int(np.clip(s.pitch + rng.randint(-15, 15), 0, 100)),
            pitch_range=rng.randint(20, 90)))
    return out


def plan_splits(train_utterances: int, test_utterances: int, train_voices: list[str], test_voices: list[str],
                chapters_per_speaker: int, pause_prob: float, max_pause_ms: int,
                seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """(train, test) utterances before any audio: the first ``test_utterances`` sentences of the seed's
    draw are the test split, the next ``train_utterances`` the train split; each split draws its speakers'
    habits and its prosody from its own generator."""
    texts = sentences(test_utterances + train_utterances, seed)
    split = {}
    for name, voices, first_id, chosen in (("test", test_voices, 900, texts[:test_utterances]),
                                           ("train", train_voices, 100, texts[test_utterances:])):
        rng = random.Random(f"{seed}-{name}")
        split[name] = plan(chosen, speakers(voices, first_id, rng), chapters_per_speaker, rng, pause_prob,
                           max_pause_ms)
    return split["train"], split["test"]


def word_starts(ssml: str, events: np.ndarray, where: str) -> np.ndarray:
    """The sample each word of ``ssml`` (its text outside tags) starts at, from ``Espeak.synth``'s word
    events. espeak speaks some runs of words as one ("in the", "for a"), with one event whose character
    position may fall inside the run's first word: a word belongs to the last event at or before its
    first character, and words of one event share its start."""
    import re

    text = re.sub(r"<[^>]*>", lambda m: " " * len(m.group()), ssml)  # tags blanked: positions kept
    chars = [m.start() for m in re.finditer(r"\S+", text)]
    position, sample = events[:, 0] - 1, events[:, 1]
    if (np.diff(sample) < 0).any() or (np.diff(position) < 0).any():
        raise RuntimeError(f"synthesize: {where}: espeak-ng's word events of {ssml!r} are out of order")
    starts, prev = [], -1
    for c in chars:
        k = int(np.searchsorted(position, c, side="right")) - 1
        if k < 0:
            raise RuntimeError(f"synthesize: {where}: espeak-ng reported no word event before character {c} of {ssml!r}")
        # Events that no word starts after (an empty run) belong to the next word: its earliest start.
        starts.append(int(sample[prev + 1 : k + 1].min()) if k > prev else int(sample[k]))
        prev = max(prev, k)
    return np.asarray(starts, dtype=np.int64)


def word_spans(audio: np.ndarray, starts: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) in seconds of each word: from its start to where its audio last rises above
    WORD_END_DBFS before the next word's start (or the utterance's end). Words that share a start
    (espeak spoke them as one) share the span."""
    hop = max(1, int(rate * _LEVEL_HOP_S))
    n = len(audio) // hop
    level = 10 * np.log10((audio[: n * hop].astype(np.float64).reshape(n, hop) / 32768.0) ** 2 + 1e-12).max(1)
    loud = level > WORD_END_DBFS
    ends = []
    for s in starts.tolist():
        nxt = next((t for t in starts.tolist() if t > s), len(audio))
        hops = np.nonzero(loud[s // hop : max(s // hop + 1, nxt // hop)])[0]
        ends.append(min(nxt, (s // hop + hops[-1] + 1) * hop) if len(hops) else s)
    return starts / rate, np.asarray(ends, dtype=np.float64) / rate


# Utterances per fresh espeak-ng process (see the module's docstring). Part of what the audio is: a
# change re-makes the corpus.
BLOCK = 64


def _speak_block(job: tuple[list[Utterance], Path]) -> list[tuple[str, list[str], list[float], list[float]]]:
    """In a fresh process: speak ``utts`` in order, write each ``<spk>/<chapter>/<utt>.flac`` under
    ``split_dir``, return each one's (utt_id, words, word starts, word ends)."""
    utts, split_dir = job
    engine = Espeak()
    out = []
    for u in utts:
        engine.set_voice(u.speaker.voice)
        audio, events = engine.synth(u.ssml, u.rate, u.pitch, u.pitch_range)
        start, end = word_spans(audio, word_starts(u.ssml, events, u.utt_id), engine.sample_rate)
        chapter_dir = split_dir / u.speaker.speaker_id / u.chapter_id
        chapter_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(chapter_dir / f"{u.utt_id}.flac") as tmp:
            sf.write(tmp, audio, engine.sample_rate, format="FLAC", subtype="PCM_16")
        out.append((u.utt_id, u.text.split(), start.tolist(), end.tolist()))
    return out


def write_split(utts: list, split_dir: Path, desc: str, words_path: Path | None = None,
                workers: int | None = None, speak=None) -> None:
    """Synthesize and write ``<spk>/<chapter>/<utt>.flac`` plus one ``<spk>-<chapter>.trans.txt`` each,
    and with ``words_path`` the true word timings (tables.WORDS). Blocks of ``BLOCK`` utterances, in the
    plan's order, each in a fresh process, ``workers`` at a time (default: every core): the audio is the
    same for any number of workers. ``speak``: the block function of another engine (kokoro's
    ``speak_block``: the same contract as ``_speak_block``; default espeak-ng)."""
    from . import tables

    if speak is None:
        engine = Espeak()  # a missing library or voice fails here, not in a worker
        for voice in sorted({u.speaker.voice for u in utts}):
            engine.set_voice(voice)
    blocks = [(utts[i:i + BLOCK], split_dir) for i in range(0, len(utts), BLOCK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(blocks)) or 1
    spoken = []
    # spawn, one block per process: a forked or reused worker would carry espeak-ng's state.
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool, \
            tqdm(total=len(utts), desc=desc, unit="utt") as bar:
        for block in pool.imap(speak or _speak_block, blocks):
            spoken += block
            bar.update(len(block))
    spoken.sort()
    transcripts: dict[Path, list[str]] = {}
    by_id = {u.utt_id: u for u in utts}
    for utt_id, words, _, _ in spoken:
        u = by_id[utt_id]
        transcripts.setdefault(split_dir / u.speaker.speaker_id / u.chapter_id /
                               f"{u.speaker.speaker_id}-{u.chapter_id}.trans.txt", []).append(f"{utt_id} {u.text.upper()}")
    for path, lines in transcripts.items():
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    if words_path is not None:
        words_path.parent.mkdir(parents=True, exist_ok=True)
        tables.write_table(words_path, {key: [row[i] for row in spoken] for i, key in
                                        enumerate(("utt_id", "words", "start", "end"))}, tables.WORDS)


def synthesize(out_dir: str | Path, train_split: str, test_split: str, train_utterances: int,
               test_utterances: int, train_voices: list[str], test_voices: list[str],
               chapters_per_speaker: int, pause_prob: float, max_pause_ms: int, seed: int,
               words_dir: str | Path | None = None, workers: int | None = None) -> None:
    """Write the embedded corpus (``plan_splits``): ``out_dir/<train_split>`` and ``out_dir/<test_split>``,
    and with ``words_dir`` each split's true word timings, ``words_dir/<split>.parquet``."""
    for voice in [*train_voices, *test_voices]:
        Espeak.check_reproducible(voice)
    if set(train_voices) & set(test_voices):
        raise ValueError(f"synthesize: voices {sorted(set(train_voices) & set(test_voices))} are in both splits")
    train, test = plan_splits(train_utterances, test_utterances, train_voices, test_voices, chapters_per_speaker,
                              pause_prob, max_pause_ms, seed)
    words = (lambda split: Path(words_dir) / f"{split}.parquet") if words_dir is not None else (lambda split: None)
    write_split(test, Path(out_dir) / test_split, test_split, words(test_split), workers)
    write_split(train, Path(out_dir) / train_split, train_split, words(train_split), workers)


def parallel(out_dir: str | Path, split: str, texts: list[str], voices: list[str], seed: int,
             words_dir: str | Path) -> None:
    """A split where every voice speaks every text, without breaks (``out_dir/<split>``, LibriSpeech
    layout, and its word timings ``words_dir/<split>.parquet``): the same sentences in several voices,
    to measure how much target units change with the voice (``targets``)."""
    for voice in voices:
        Espeak.check_reproducible(voice)
    rng = random.Random(seed)
    utts = []
    for s in speakers(voices, 800, rng):
        utts += plan(texts, [s], 1, rng, pause_prob=0.0, max_pause_ms=0)
    write_split(utts, Path(out_dir) / split, split, Path(words_dir) / f"{split}.parquet")
