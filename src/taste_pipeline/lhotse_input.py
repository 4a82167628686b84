"""Corpora in lhotse manifests (``data.format: lhotse``): a RecordingSet and a SupervisionSet per split.

lhotse's recipes (``lhotse prepare librispeech``, ``libritts``, dozens more) write
``<prefix>_recordings_<split>.jsonl.gz`` and ``<prefix>_supervisions_<split>.jsonl.gz``; ``data.root`` is
the folder holding them. Each supervision becomes one utterance: its segment of its recording (a
segment inside a long recording too), its channel(s) averaged to mono, read through lhotse whatever the
audio format. The result is the same list of ``inputs.Entry`` the LibriSpeech-layout scan gives, so the
same checks, rejects, repairs and strict mode apply.

Field mapping: ``utt_id`` = supervision id, ``speaker_id`` = supervision speaker, ``chapter_id`` = the
chapter of a LibriSpeech-style id (``<speaker>-<chapter>-<n>``), else the recording id.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from .inputs import BadInput, Entry, Reject, check_finite


def manifest_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """The recordings and supervisions manifests of ``split`` in ``root``; exactly one of each."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: lhotse manifest folder {root} does not exist")
    found = []
    for kind in ("recordings", "supervisions"):
        files = sorted(root.glob(f"*_{kind}_{split}.jsonl.gz"))
        if len(files) != 1:
            raise FileNotFoundError(f"data.root / data.splits: {root} holds {len(files)} files matching "
                                    f"*_{kind}_{split}.jsonl.gz ({[f.name for f in files]}); need exactly one")
        found.append(files[0])
    return found[0], found[1]


def _source(recording) -> str:
    return ", ".join(str(s.source) for s in recording.sources)


def _load(recording, supervision) -> tuple[np.ndarray, int]:
    """The supervision's segment as float32 mono at the recording's rate (channels averaged)."""
    whole = supervision.start == 0 and abs(supervision.duration - recording.duration) < 1e-6
    try:
        # A supervision that is the whole recording reads it whole: no duration-to-samples rounding.
        x = recording.load_audio(channels=supervision.channel,
                                 **({} if whole else {"offset": supervision.start, "duration": supervision.duration}))
    except Exception as e:  # lhotse raises many kinds (its own, soundfile's, audioread's): all mean unreadable
        raise BadInput(f"{_source(recording)}: not readable through lhotse ({type(e).__name__}: {e})") from e
    x = np.asarray(x, dtype=np.float32)
    mono = x.mean(axis=0) if x.ndim == 2 else x
    if mono.size == 0:
        raise BadInput(f"{_source(recording)}: supervision {supervision.id} has no samples")
    check_finite(_source(recording), mono)
    return mono, recording.sampling_rate


def _chapter(utt_id: str, recording_id: str) -> str:
    parts = utt_id.split("-")
    return parts[1] if len(parts) == 3 and all(parts) else recording_id


def scan_lhotse(root: str | Path, split: str) -> tuple[list[Entry], list[Reject]]:
    """Entries (one per supervision id) and the rejects found before any audio is read."""
    from lhotse import load_manifest_lazy

    rec_file, sup_file = manifest_files(root, split)
    recordings = {r.id: r for r in load_manifest_lazy(rec_file)}
    rejects: list[Reject] = []
    first: dict[str, tuple] = {}
    problems: dict[str, str] = {}
    for n, sup in enumerate(load_manifest_lazy(sup_file), 1):
        where = f"{sup_file} supervision {n}"
        key = (sup.recording_id, sup.start, sup.duration, sup.channel, sup.text)
        if sup.id in first:
            if first[sup.id][1] != key and sup.id not in problems:
                problems[sup.id] = (f"{where}: a second supervision {sup.id} that differs from {first[sup.id][0]} "
                                    f"({first[sup.id][1][4]!r} vs {sup.text!r}); which is right is unknown")
            continue
        first[sup.id] = (where, key, sup)
    entries = []
    used = set()
    for utt_id in sorted(first):
        where, _, sup = first[utt_id]
        rec = recordings.get(sup.recording_id)
        problem = problems.get(utt_id)
        if rec is None and not problem:
            problem = f"{where}: supervision {utt_id} names recording {sup.recording_id!r}, which {rec_file} lacks"
        if not sup.speaker and not problem:
            problem = f"{where}: supervision {utt_id} has no speaker (needed for speaker-disjoint splits)"
        if rec is not None:
            used.add(rec.id)
        entries.append(Entry(utt_id, sup.speaker or "", _chapter(utt_id, sup.recording_id), (sup.text or "").strip(),
                             Path(_source(rec)) if rec is not None else None, sup_file, problem,
                             load=partial(_load, rec, sup) if rec is not None else None))
    for rid in sorted(set(recordings) - used):
        rejects.append(Reject(rid, _source(recordings[rid]), f"{_source(recordings[rid])}: recording {rid} of "
                              f"{rec_file} has no supervision in {sup_file}"))
    return entries, rejects
