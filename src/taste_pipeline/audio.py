"""LibriSpeech-layout corpora -> 16 kHz mono audio and a manifest, with every input accounted for.

A split folder holds ``<speaker>/<chapter>/<speaker>-<chapter>-<n>.{flac,wav}`` and one
``<speaker>-<chapter>.trans.txt`` per chapter (``utt_id TEXT`` lines). Each transcript line and each
audio file ends up either in the manifest or in the rejects table with a reason a person understands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from . import tables
from .tables import MANIFEST, REJECTS, SAMPLE_RATE

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


@dataclass(frozen=True)
class Reject:
    utt_id: str
    path: str
    reason: str


def scan_split(split_dir: str | Path) -> tuple[list[Entry], list[Reject]]:
    """Pair transcript lines with audio files. Unparseable transcript lines are rejects at once."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split folder {split_dir} does not exist")
    texts: dict[str, tuple[str, Path]] = {}
    rejects: list[Reject] = []
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            where = f"{trans}:{lineno}"
            if utt_id in texts:
                rejects.append(Reject(utt_id, where, f"duplicate transcript line (first in {texts[utt_id][1]})"))
            else:
                texts[utt_id] = (text.strip(), trans)
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
        text, trans = texts.get(utt_id, (None, None))
        entries.append(Entry(utt_id, speaker, chapter, text, audio.get(utt_id), trans))
    return entries, rejects


def load_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Read any soundfile-readable file as float32 mono (channels averaged) and its sample rate."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BadInput(f"{path}: symbolic link to a missing file ({os.readlink(path)})")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file (0 bytes)")
    try:
        declared = sf.info(path).frames
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        reason = "truncated or corrupt audio" if "lost sync" in str(e) else "not readable as audio"
        raise BadInput(f"{path}: {reason} ({e})") from e
    if data.shape[0] == 0:
        raise BadInput(f"{path}: audio has no samples")
    if 0 < data.shape[0] < declared:
        raise BadInput(f"{path}: truncated audio (the header promises {declared} samples, the file holds {data.shape[0]})")
    return data.mean(axis=1), rate


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32, copy=False)
    return torchaudio.functional.resample(torch.from_numpy(audio), rate, target).numpy()


def _check(entry: Entry) -> None:
    """Raise BadInput for an entry that can never make a manifest row, before touching the audio."""
    if entry.audio is None:
        raise BadInput(f"{entry.transcript}: utterance {entry.utt_id}: no audio file found")
    if entry.text is None:
        raise BadInput(f"{entry.audio}: no transcript line for utterance {entry.utt_id}")
    if not entry.text:
        raise BadInput(f"{entry.transcript}: utterance {entry.utt_id} has an empty transcript")
    if not entry.speaker_id:
        raise BadInput(f"{entry.audio}: utterance id {entry.utt_id!r} is not <speaker>-<chapter>-<n>")


def check_not_silent(path: Path, audio: np.ndarray, silence_dbfs: float | None) -> None:
    """A transcript paired with silence is a bad pair (nothing to align the words to): reject it."""
    if silence_dbfs is None:
        return
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak < 10 ** (silence_dbfs / 20):
        level = f"{20 * np.log10(peak):.0f} dBFS" if peak > 0 else "digital silence"
        raise BadInput(f"{path}: silent audio (peak {level}, below resample.silence_dbfs = {silence_dbfs:g})")


def resample_split(split_dir: str | Path, out_dir: str | Path, strict: bool = False,
                   silence_dbfs: float | None = -60.0) -> tuple[int, int]:
    """Resample a split to 16 kHz mono FLAC under ``out_dir/audio`` and write the manifest and rejects.

    Returns (kept, rejected). With ``strict`` the first bad input raises ``BadInput`` instead.
    """
    out_dir = Path(out_dir)
    entries, rejects = scan_split(split_dir)
    if strict and rejects:
        raise BadInput(f"{rejects[0].path}: {rejects[0].reason}")
    rows: list[dict] = []
    for entry in tqdm(entries, desc=f"resample {Path(split_dir).name}", unit="utt"):
        try:
            _check(entry)
            audio, rate = load_mono(entry.audio)
            check_not_silent(entry.audio, audio, silence_dbfs)
            audio = np.clip(resample(audio, rate), -1.0, 1.0)
        except BadInput as e:
            if strict:
                raise
            rejects.append(Reject(entry.utt_id, str(entry.audio or entry.transcript), str(e)))
            continue
        rel = Path("audio") / entry.speaker_id / entry.chapter_id / f"{entry.utt_id}.flac"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with tables.atomic_path(out_dir / rel) as tmp:
            sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append(dict(utt_id=entry.utt_id, speaker_id=entry.speaker_id, chapter_id=entry.chapter_id,
                         text=entry.text, num_samples=len(audio), duration=len(audio) / SAMPLE_RATE,
                         audio_path=rel.as_posix()))
    manifest = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in MANIFEST}, schema=MANIFEST)
    tables.write_table(out_dir / "manifest.parquet", tables.validate_manifest(manifest), MANIFEST)
    rejects.sort(key=lambda r: (r.utt_id, r.path))
    tables.write_table(out_dir / "rejects.parquet",
                       {f.name: [getattr(r, f.name) for r in rejects] for f in REJECTS}, REJECTS)
    return len(rows), len(rejects)


def load_utterance(manifest_dir: str | Path, row: dict) -> np.ndarray:
    """The 16 kHz audio of a manifest row; fails naming the utterance if it is missing or altered."""
    path = Path(manifest_dir) / row["audio_path"]
    if not path.exists():
        raise FileNotFoundError(f"utterance {row['utt_id']}: audio {path} is missing")
    audio, rate = sf.read(path, dtype="float32")
    if rate != SAMPLE_RATE or audio.ndim != 1 or len(audio) != row["num_samples"]:
        raise BadInput(f"utterance {row['utt_id']}: {path} is {rate} Hz, shape {audio.shape}; "
                       f"the manifest says {SAMPLE_RATE} Hz mono, {row['num_samples']} samples")
    return audio
