"""LibriSpeech-layout corpora -> 16 kHz mono audio and a manifest, with every input accounted for.

A split folder holds ``<speaker>/<chapter>/<speaker>-<chapter>-<n>.{flac,wav}`` and one
``<speaker>-<chapter>.trans.txt`` per chapter (``utt_id TEXT`` lines, UTF-8). Each transcript line and
each audio file ends up either in the manifest or in the rejects table with a reason a person
understands. What is repaired instead (float audio above full scale, scaled down rather than clipped) is
kept and noted in the repairs table.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from . import tables
from .inputs import BadInput, Entry, Reject, Repair, check_finite, scan_split  # noqa: F401
from .tables import MANIFEST, REJECTS, REPAIRS, SAMPLE_RATE


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
    check_finite(path, data)
    if 0 < data.shape[0] < declared:
        raise BadInput(f"{path}: truncated audio (the header promises {declared} samples, the file holds {data.shape[0]})")
    return data.mean(axis=1), rate


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32, copy=False)
    return torchaudio.functional.resample(torch.from_numpy(audio), rate, target).numpy()


def _check(entry: Entry) -> None:
    """Raise BadInput for an entry that can never make a manifest row, before touching the audio."""
    if entry.problem:
        raise BadInput(entry.problem)
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


# Float audio lives in [-1, 1]; 16-bit FLAC saturates 1.0 to 32767/32768 as every 16-bit writer does.
FULL_SCALE = 1.0


def fit_full_scale(path: Path, audio: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Input audio above full scale (only float files can be), scaled rather than clipped, so the
    waveform keeps its shape; returns it and the note for the repairs table."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak <= FULL_SCALE:
        return audio, None
    return (audio * (FULL_SCALE / peak)).astype(np.float32), (
        f"{path}: peak {peak:.3f} above full scale (float audio); scaled by {FULL_SCALE / peak:.4f} instead of clipped")


def resample_split(split_dir: str | Path, out_dir: str | Path, strict: bool = False,
                   silence_dbfs: float | None = -60.0, fmt: str = "librispeech") -> tuple[int, int]:
    """Resample a split to 16 kHz mono FLAC under ``out_dir/audio`` and write the manifest, the rejects
    and the repairs.

    ``fmt`` (``data.format``): ``librispeech``, ``split_dir`` is a LibriSpeech-layout split folder;
    ``lhotse``, it is ``<manifest folder>/<split name>`` (``lhotse_input``). Returns (kept, rejected).
    With ``strict`` the first bad input, or one that needs a repair, raises ``BadInput`` instead.
    """
    out_dir = Path(out_dir)
    if fmt == "lhotse":
        from .lhotse_input import scan_lhotse

        entries, rejects = scan_lhotse(Path(split_dir).parent, Path(split_dir).name)
    elif fmt == "librispeech":
        entries, rejects = scan_split(split_dir)
    else:
        raise ValueError(f"data.format: {fmt!r} is not one of librispeech, lhotse")
    if strict and rejects:
        raise BadInput(f"{rejects[0].path}: {rejects[0].reason}")
    rows: list[dict] = []
    repairs: list[Repair] = []
    for entry in tqdm(entries, desc=f"resample {Path(split_dir).name}", unit="utt"):
        try:
            _check(entry)
            audio, rate = entry.load() if entry.load else load_mono(entry.audio)
            check_not_silent(entry.audio, audio, silence_dbfs)
            audio, note = fit_full_scale(entry.audio, audio)
            if note and strict:
                raise BadInput(f"{note} (resample.strict: repairs stop the stage too)")
            if note:
                repairs.append(Repair(entry.utt_id, str(entry.audio), note))
            # The resampler's own overshoot of a peak near full scale (157 of the embedded corpus' 1,160
            # utterances, by at most 0.8 %) is clipped: it is how band-limiting meets 16 bits, not the input.
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
    tables.write_table(out_dir / "repairs.parquet", tables.validate_repairs(pa.Table.from_pydict(
        {f.name: [getattr(r, f.name) for r in repairs] for f in REPAIRS}, schema=REPAIRS)), REPAIRS)
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
