"""The one loop every per-utterance extraction stage runs (whisper, s3, tokenize).

A stage supplies what is its own: the table's schema and metadata, what its rows depend on (the
fingerprint), and ``encode(rows, audios) -> columns`` for one row group. This module does the rest,
the same way for each: row groups of ``rows_per_group`` utterances in manifest order, shared out among
torchrun ranks (group k to rank k % world), finished groups kept in ``partial_dir`` so a killed run
resumes, rank 0 joining the shards into the one table a single process writes, and a progress bar in
seconds of audio.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from . import audio, tables
from .ranks import Ranks
from .tables import SAMPLE_RATE

Encode = Callable[[list[dict], list[np.ndarray]], dict[str, list]]


def fingerprint(manifest_path: str | Path, settings, files: list[Path] = ()) -> str:
    """What the rows depend on: the settings (JSON-able; leave out the device, a run resumed on another
    device is as good), the manifest's bytes and any model files."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(Path(manifest_path).read_bytes())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def row_groups(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"rows_per_group: must be at least 1, got {size}")
    return [slice(b, min(n, b + size)) for b in range(0, n, size)]


def run(stage: str, manifest_path: str | Path, out_path: str | Path, schema: pa.Schema, metadata: dict[str, str],
        settings, encode: Encode, rows_per_group: int, partial_dir: str | Path | None = None,
        ranks: Ranks | None = None, files: list[Path] = (), needs_audio: bool = True) -> int:
    """Write ``out_path`` from the manifest through ``encode``; returns the number of rows.

    ``encode`` gets a group's manifest rows and their audio and returns the table's columns other than
    ``utt_id`` (which comes from the rows, so a table can't drift from its manifest's order). A stage
    that reads other tables instead of the audio (tokenize) says ``needs_audio=False`` and gets None
    for each utterance's audio.
    """
    from tqdm import tqdm

    ranks = ranks or Ranks()
    manifest_path = Path(manifest_path)
    manifest = tables.read_manifest(manifest_path).to_pylist()
    groups = row_groups(len(manifest), rows_per_group)
    mine = [sl for k, sl in enumerate(groups) if ranks.owns(k)]
    desc = f"{stage} {manifest_path.parent.name}" + (f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "")
    fp = fingerprint(manifest_path, settings, files)
    # Count samples (integers) so the bar never overshoots by float rounding; show them as seconds.
    with tables.TableWriter(out_path, schema, metadata, partial_dir, fp, ranks) as writer, \
            tqdm(total=sum(r["num_samples"] for sl in mine for r in manifest[sl]), unit="audio-s",
                 unit_scale=1 / SAMPLE_RATE, desc=desc) as bar:
        for group, sl in enumerate(groups):
            rows = manifest[sl]
            if not writer.todo(group):
                if ranks.owns(group):
                    bar.update(sum(r["num_samples"] for r in rows))
                continue
            audios = [audio.load_utterance(manifest_path.parent, r) if needs_audio else None for r in rows]
            columns = encode(rows, audios)
            writer.write({"utt_id": [r["utt_id"] for r in rows], **columns}, group)
            bar.update(sum(r["num_samples"] for r in rows))
        if writer.resumed_groups:
            bar.write(f"resumed: {writer.resumed_groups} row groups were finished by an earlier run")
    return writer.num_rows
