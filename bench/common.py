"""What the bench scripts share: a speech mix to time on, and a timer."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from taste_pipeline import audio, corpus, tables

# Lengths (s) of the default mix: short espeak sentences as made, and utterances glued together up to
# LibriSpeech's range (train-clean-100: most 10-17 s, the longest ~35 s).
DEFAULT_MIX = [2, 4, 4, 6, 8, 10, 12, 12, 14, 15, 16, 17, 20, 25, 30, 34]


def speech_mix(manifest: str | None, lengths: list[float] = DEFAULT_MIX, seed: int = 11) -> list[np.ndarray]:
    """16 kHz mono utterances: every row of ``manifest`` if given, else espeak speech cut to ``lengths``."""
    if manifest:
        m = Path(manifest)
        return [audio.load_utterance(m.parent, r) for r in tables.read_manifest(m).to_pylist()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "LibriSpeech"
        corpus.synthesize(root, "mix", "unused", 40, 1, ["en-us", "en-us+m3"], ["en-gb-x-rp+m5"],
                          chapters_per_speaker=1, pause_prob=0.15, max_pause_ms=400, seed=seed)
        audio.resample_split(root / "mix", Path(tmp) / "mix16k")
        m = Path(tmp) / "mix16k" / "manifest.parquet"
        stream = np.concatenate([audio.load_utterance(m.parent, r) for r in tables.read_manifest(m).to_pylist()])
    out, pos = [], 0
    for s in lengths:
        n = int(s * tables.SAMPLE_RATE)
        if pos + n > len(stream):
            pos = 0
        out.append(stream[pos : pos + n].copy())
        pos += n
    return out


def describe(audios: list[np.ndarray]) -> str:
    secs = np.array([len(a) / tables.SAMPLE_RATE for a in audios])
    return (f"{len(secs)} utterances, {secs.sum():.0f} s of audio; length min {secs.min():.1f} s, "
            f"median {np.median(secs):.1f} s, max {secs.max():.1f} s")


def timed(fn, *args, repeat: int = 1):
    """(result of the last call, best wall seconds over ``repeat`` calls)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def make_tables(out: Path, n: int, seconds: int, width: int = 384, seed: int = 0,
                rows_per_group: int = 8) -> dict[str, Path]:
    """The five tables of a split of ``n`` utterances (4 speakers), random features."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    frames = tables.frames_for(seconds * tables.SAMPLE_RATE)
    ids = [f"{i % 4}-1-{i:04d}" for i in range(n)]
    manifest = {"utt_id": ids, "speaker_id": [u.split("-")[0] for u in ids], "chapter_id": ["1"] * n,
                "text": ["memory probe"] * n, "num_samples": [seconds * tables.SAMPLE_RATE] * n,
                "duration": [float(seconds)] * n, "audio_path": [f"audio/{u}.flac" for u in ids]}
    tables.write_table(out / "manifest.parquet", manifest, tables.MANIFEST)
    mats = lambda rows: tables.matrix_column([rng.standard_normal((rows, width)).astype(np.float16) for _ in ids], width)  # noqa: E731
    tokens = 3 * seconds
    tables.write_table(out / "whisper.parquet", {"utt_id": ids, "num_frames": [frames] * n, "mid": mats(frames),
                                                 "last": mats(frames)}, tables.whisper_schema(width, width),
                       rows_per_group=rows_per_group)
    tables.write_table(out / "text.parquet", {"utt_id": ids, "token_ids": [list(range(100, 100 + tokens))] * n,
                                              "emb": mats(tokens)}, tables.text_schema(width), rows_per_group=rows_per_group)
    tables.write_table(out / "s3.parquet", {"utt_id": ids, "num_tokens": [frames] * n,
                                            "tokens": [rng.integers(0, 16, frames).tolist() for _ in ids]},
                       tables.S3, metadata={"targets": "random (memory probe)", "vocab_size": "16"}, rows_per_group=rows_per_group)
    tables.write_table(out / "speaker.parquet", {"utt_id": ids, "emb": rng.standard_normal((n, 256)).tolist()},
                       tables.speaker_schema(256), metadata={"speaker.source": "random (memory probe)"})
    return {k: out / f"{k}.parquet" for k in ("manifest", "whisper", "text", "s3", "speaker")}
