"""What a split holds before it is resampled: one ``Entry`` per utterance (its transcript line and its
audio file), the ``Reject``s and ``Repair``s the resample stage records, and the scan of a
LibriSpeech-layout split folder. The lhotse scan (``lhotse_input``) gives the same entries."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

AUDIO_SUFFIXES = (".flac", ".wav")


class BadInput(ValueError):
    """An input file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Entry:
    """One utterance found in a split folder: its transcript line and/or its audio file."""

    utt_id: str
    speaker_id: str
    chapter_id: str
    text: str | None  # None: no transcript line
    audio: Path | None  # None: no audio file
    transcript: Path | None
    problem: str | None = None  # a transcript that cannot be trusted (the reason, naming file and line)
    # How to read the audio as (float32 mono, rate); None: ``load_mono(audio)`` (lhotse entries bring theirs).
    load: Callable[[], tuple[np.ndarray, int]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reject:
    utt_id: str
    path: str
    reason: str


@dataclass(frozen=True)
class Repair:
    utt_id: str
    path: str
    repair: str


def _transcript_lines(trans: Path):
    """(line number, utt_id, text or None, problem or None) per non-empty line; a line that is not
    UTF-8 is a problem, not replacement characters in a kept transcript.

    What editors leave is read as meant: a UTF-8 byte-order mark before the first id, and a tab (or
    several blanks) between id and text; an id never holds white space, so the first run of it ends the id."""
    data = trans.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        head, rest = (re.split(rb"\s+", raw.strip(), maxsplit=1) + [b""])[:2]
        utt_id = head.decode("utf-8", errors="replace")
        try:
            yield lineno, utt_id, rest.decode("utf-8").strip(), None
        except UnicodeDecodeError as e:
            byte = rest[e.start : e.start + 1].hex()
            yield lineno, utt_id, None, (f"{trans}:{lineno}: transcript is not UTF-8 (byte 0x{byte} at column "
                                         f"{len(head) + 2 + e.start}; re-encode the file as UTF-8)")


def scan_split(split_dir: str | Path) -> tuple[list[Entry], list[Reject]]:
    """Pair transcript lines with audio files. A line that cannot be trusted (not UTF-8, a second line
    with another text) marks its utterance's entry with the problem, which then becomes its reject; a
    second audio file for one utterance is a reject at once."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split folder {split_dir} does not exist")
    texts: dict[str, tuple[str | None, Path, str]] = {}  # utt_id -> (text, file, file:line)
    problems: dict[str, str] = {}
    rejects: list[Reject] = []
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for lineno, utt_id, text, problem in _transcript_lines(trans):
            where = f"{trans}:{lineno}"
            if problem:
                problems.setdefault(utt_id, problem)
            if utt_id not in texts:
                texts[utt_id] = (text, trans, where)
            elif text != texts[utt_id][0] and utt_id not in problems:
                # Which of two different texts is right is unknown: the utterance is rejected, not guessed.
                problems[utt_id] = (f"{where}: a second transcript line for {utt_id} with another text than "
                                    f"{texts[utt_id][2]} ({texts[utt_id][0]!r} vs {text!r}); which is right is unknown")
    audio: dict[str, Path] = {}
    for path in sorted(split_dir.rglob("*")):
        if path.suffix.lower() in AUDIO_SUFFIXES and (path.is_file() or path.is_symlink()):
            utt_id = path.name[: -len(path.suffix)]
            if utt_id in audio:
                rejects.append(Reject(utt_id, str(path), f"second audio file for the utterance (also {audio[utt_id]})"))
            else:
                audio[utt_id] = path
    entries = []
    for utt_id in sorted(set(texts) | set(audio)):
        parts = utt_id.split("-")
        speaker, chapter = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        text, trans, _ = texts.get(utt_id, (None, None, None))
        entries.append(Entry(utt_id, speaker, chapter, text, audio.get(utt_id), trans, problems.get(utt_id)))
    return entries, rejects


def check_finite(path, data: np.ndarray) -> None:
    """NaN or infinite samples (float files can hold them) would poison every feature: a reject."""
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise BadInput(f"{path}: {bad} samples are NaN or infinite (float audio with non-finite values)")
