"""Every Parquet table of the pipeline: its schema, written once, and checked on read and write.

Feature matrices are stored as ``list<fixed_size_list<float16, D>>`` so a row is self-describing
(frames x width) and the width is part of the schema a reader checks.  Writers are atomic: rows go to
a temporary file beside the destination which is renamed into place only when complete, so an
interrupted stage never leaves a half table where DVC would cache it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class SchemaError(ValueError):
    """A table does not have the columns, types or values the pipeline expects."""


MANIFEST = pa.schema(
    [
        ("utt_id", pa.string()),
        ("speaker_id", pa.string()),
        ("chapter_id", pa.string()),
        ("text", pa.string()),
        ("num_samples", pa.int64()),
        ("duration", pa.float64()),
        # Relative to the manifest's own folder, so a split folder can be moved as a whole.
        ("audio_path", pa.string()),
    ]
)

REJECTS = pa.schema([("utt_id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
# Inputs kept after a repair (e.g. float audio above full scale, scaled down): what was done, and to which file.
REPAIRS = pa.schema([("utt_id", pa.string()), ("path", pa.string()), ("repair", pa.string())])


def matrix_type(width: int) -> pa.DataType:
    """Per-row (frames x width) float16 matrix."""
    return pa.list_(pa.list_(pa.float16(), width))


def whisper_schema(mid_width: int, last_width: int) -> pa.Schema:
    return pa.schema(
        [
            ("utt_id", pa.string()),
            ("num_frames", pa.int32()),
            ("mid", matrix_type(mid_width)),
            ("last", matrix_type(last_width)),
        ]
    )


def text_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("utt_id", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("emb", matrix_type(width)),
        ]
    )


# Targets, 50 Hz. The schema metadata names the tokenizer ("targets") so no stand-in passes for S3.
S3 = pa.schema([("utt_id", pa.string()), ("num_tokens", pa.int32()), ("tokens", pa.list_(pa.int32()))])



# True word timings of the embedded corpus (the synthesize stage: espeak-ng's word events), in seconds.
WORDS = pa.schema([("utt_id", pa.string()), ("words", pa.list_(pa.string())), ("start", pa.list_(pa.float64())),
                   ("end", pa.list_(pa.float64()))])


# Free-running units (the evaluate stage): per test utterance and source (a variant, or true_units), the
# units it decoded, for rebuilding speech elsewhere (CosyVoice's flow + HiFT with S3 targets: docs/RESULTS.md).
# The metadata names the targets, the sampling (top_k, seed) and the test split.
FREE_UNITS = pa.schema([("utt_id", pa.string()), ("source", pa.string()), ("units", pa.list_(pa.int32()))])
FREE_UNITS_META = ("targets", "free_top_k", "seed", "test_manifest")


def speaker_schema(width: int) -> pa.Schema:
    """One speaker embedding per utterance (the speaker stage); the metadata names its encoder."""
    return pa.schema([("utt_id", pa.string()), ("emb", pa.list_(pa.float32(), width))])


def codes_schema(levels: int) -> pa.Schema:
    """TASTE tokens (the tokenize stage): per text token, one row of ``levels`` codes: the residual-VQ
    levels, then its duration in frames when the metadata has ``duration_bits``."""
    return pa.schema(
        [
            ("utt_id", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("codes", pa.list_(pa.list_(pa.int32(), levels))),
        ]
    )


# Whisper and text tables carry their widths in their types; these name the fixed part.
WHISPER_COLUMNS = ("utt_id", "num_frames", "mid", "last")
TEXT_COLUMNS = ("utt_id", "token_ids", "emb")
CODES_COLUMNS = ("utt_id", "token_ids", "codes")
SPEAKER_COLUMNS = ("utt_id", "emb")
# What a codes table's metadata must state: the model, its quantizer and the bitrate over the split
# (and ``duration_bits`` where each token's last code is its duration: train.unit_alignment durations).
CODES_META = ("tokenizer.model", "rvq_levels", "rvq_codebook_size", "bits_per_token", "text_tokens_per_s", "bitrate_bps")

# Whisper's encoder emits one frame per 320 samples (two 10 ms mel hops) at 16 kHz: 50 frames/s.
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320


def frames_for(num_samples: int) -> int:
    """Number of 20 ms frames that cover ``num_samples`` at 16 kHz: ceil(num_samples / 320)."""
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


# ---------------------------------------------------------------------------------------------
# Atomic writing


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


class TableWriter:
    """Streams record batches into a Parquet file as row groups; atomic on close.

    Use as a context manager; if the block raises, the destination is left untouched.

    With ``partial_dir`` each ``write(rows, group=k)`` is also a finished shard file there, written
    atomically, and a rerun after a kill skips the groups whose shards exist (``todo``); they
    count only while ``fingerprint`` (what the rows depend on) is unchanged. On success the shards
    are joined into the destination, one row group each, and the folder is removed. It must sit
    outside the stage's DVC outputs, which DVC deletes before a stage runs.

    Under torchrun (``ranks`` with world > 1) each rank computes the groups it ``owns`` and rank 0
    joins everyone's shards once all are done: the same bytes as one process would write.
    """

    def __init__(self, dest: str | os.PathLike, schema: pa.Schema, metadata: dict[str, str] | None = None,
                 partial_dir: str | os.PathLike | None = None, fingerprint: str = "", ranks=None):
        from .ranks import Ranks

        self.schema = schema.with_metadata(metadata) if metadata else schema
        self.ranks = ranks or Ranks()
        if self.ranks.world > 1 and partial_dir is None:
            raise ValueError(f"{dest}: several ranks need a partial_dir to share their row groups")
        self._ctx = atomic_path(dest)
        self._writer: pq.ParquetWriter | None = None
        self.num_rows = 0
        self.partial = Path(partial_dir) if partial_dir is not None else None
        self.fingerprint = fingerprint
        self.resumed_groups = 0

    def _shard(self, group: int) -> Path:
        return self.partial / f"part-{group:06d}.parquet"

    @property
    def joins(self) -> bool:
        return self.ranks.rank == 0

    def __enter__(self) -> "TableWriter":
        if self.partial is not None and self.joins:
            stamp = self.partial / "fingerprint.txt"
            if self.partial.exists() and (not stamp.exists() or stamp.read_text() != self.fingerprint):
                shutil.rmtree(self.partial)  # shards of other inputs or params: start over
            self.partial.mkdir(parents=True, exist_ok=True)
            stamp.write_text(self.fingerprint)
        self.ranks.barrier()
        if self.joins:
            tmp = self._ctx.__enter__()
            self._writer = pq.ParquetWriter(tmp, self.schema, **write_options(self.schema))
        return self

    def todo(self, group: int) -> bool:
        """Whether this process must compute the group: its own, and not finished by a killed earlier run."""
        if not self.ranks.owns(group):
            return False
        if self.partial is None or not self._shard(group).exists():
            return True
        try:
            pq.read_metadata(self._shard(group))
        except (OSError, pa.ArrowInvalid):
            return True
        self.resumed_groups += 1
        return False

    def write(self, rows: dict[str, list], group: int | None = None) -> None:
        if not rows or not len(next(iter(rows.values()))):
            return
        batch = pa.RecordBatch.from_pydict(rows, schema=self.schema)
        if self.partial is None:
            self._writer.write_batch(batch)
            self.num_rows += batch.num_rows
            return
        if group is None:
            raise ValueError("TableWriter with partial_dir: write(rows, group=k) needs the group index")
        with atomic_path(self._shard(group)) as tmp:
            pq.write_table(pa.Table.from_batches([batch]), tmp, **write_options(self.schema))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.ranks.barrier()  # every rank's shards are finished
        if not self.joins:
            return False
        if exc_type is None and self.partial is not None:
            for shard in sorted(self.partial.glob("part-*.parquet")):
                table = pq.read_table(shard, schema=self.schema)
                self._writer.write_table(table, row_group_size=max(1, table.num_rows))
                self.num_rows += table.num_rows
        self._writer.close()
        done = self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is None and self.partial is not None:
            shutil.rmtree(self.partial)
        return done


def write_options(schema: pa.Schema) -> dict:
    """``pyarrow.parquet`` writer options for a table of ``schema``: dictionary pages only for flat
    columns that are not floating point (ids, strings, counts). pyarrow's default puts the float16
    matrices in dictionary pages too, which saves ~6 % of the bytes and makes reading them ~6x slower
    (``bench/read.py``): reading the frames is what feeds training."""
    return {"use_dictionary": [f.name for f in schema
                               if not pa.types.is_nested(f.type) and not pa.types.is_floating(f.type)]}


def write_table(dest: str | os.PathLike, table: pa.Table | dict, schema: pa.Schema,
                metadata: dict[str, str] | None = None, rows_per_group: int | None = None) -> None:
    """Validate and write a whole table atomically (``rows_per_group`` rows per row group; None: one)."""
    if isinstance(table, dict):
        table = pa.Table.from_pydict(table, schema=schema)
    check_schema(table.schema, schema, str(dest))
    if metadata:
        table = table.replace_schema_metadata(metadata)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, row_group_size=rows_per_group, **write_options(table.schema))


# ---------------------------------------------------------------------------------------------
# Checking


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    for field in expected:
        if field.name not in actual.names:
            raise SchemaError(f"{where}: missing column {field.name!r}")
        got = actual.field(field.name).type
        if got != field.type:
            raise SchemaError(f"{where}: column {field.name!r} has type {got}, expected {field.type}")
    extra = [n for n in actual.names if n not in expected.names]
    if extra:
        raise SchemaError(f"{where}: unexpected columns {extra}")


def _unique_ids(ids: list[str], where: str) -> None:
    seen: set[str] = set()
    for u in ids:
        if u in seen:
            raise SchemaError(f"{where}: utt_id {u!r} appears more than once")
        seen.add(u)


def validate_manifest(table: pa.Table, where: str = "manifest") -> pa.Table:
    check_schema(table.schema, MANIFEST, where)
    rows = table.select(["utt_id", "text", "num_samples", "duration"]).to_pylist()
    _unique_ids([r["utt_id"] for r in rows], where)
    for r in rows:
        if r["num_samples"] <= 0:
            raise SchemaError(f"{where}: utt_id {r['utt_id']!r} has num_samples {r['num_samples']}")
        if abs(r["duration"] - r["num_samples"] / SAMPLE_RATE) > 1e-6:
            raise SchemaError(f"{where}: utt_id {r['utt_id']!r}: duration disagrees with num_samples")
        if not r["text"].strip():
            raise SchemaError(f"{where}: utt_id {r['utt_id']!r} has an empty text")
    return table


def _validate_said(table: pa.Table, schema: pa.Schema, column: str, what: str, where: str) -> pa.Table:
    """Rejects and repairs: each row must say, in ``column``, what happened to its file."""
    check_schema(table.schema, schema, where)
    for path, said in zip(table.column("path").to_pylist(), table.column(column).to_pylist()):
        if not said:
            raise SchemaError(f"{where}: {what} of {path!r} does not say {column}")
    return table


def validate_rejects(table: pa.Table, where: str = "rejects") -> pa.Table:
    return _validate_said(table, REJECTS, "reason", "reject", where)


def validate_repairs(table: pa.Table, where: str = "repairs") -> pa.Table:
    return _validate_said(table, REPAIRS, "repair", "repair", where)


def _matrix_width(table: pa.Table, column: str, where: str) -> int:
    t = table.schema.field(column).type
    if not (pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type)
            and t.value_type.value_type == pa.float16()):
        raise SchemaError(f"{where}: column {column!r} has type {t}, expected list<fixed_size_list<halffloat>>")
    return t.value_type.list_size


def validate_whisper(table: pa.Table, where: str = "whisper features") -> pa.Table:
    if list(table.schema.names) != list(WHISPER_COLUMNS):
        raise SchemaError(f"{where}: columns {table.schema.names}, expected {list(WHISPER_COLUMNS)}")
    schema = whisper_schema(_matrix_width(table, "mid", where), _matrix_width(table, "last", where))
    check_schema(table.schema, schema, where)
    _unique_ids(table.column("utt_id").to_pylist(), where)
    n = table.column("num_frames").to_numpy()
    for col in ("mid", "last"):
        lengths = table.column(col).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        bad = np.nonzero(lengths != n)[0]
        if len(bad):
            u = table.column("utt_id")[int(bad[0])].as_py()
            raise SchemaError(f"{where}: utt_id {u!r}: {col} has {lengths[bad[0]]} frames, num_frames says {n[bad[0]]}")
    return table


def validate_text(table: pa.Table, where: str = "text features") -> pa.Table:
    if list(table.schema.names) != list(TEXT_COLUMNS):
        raise SchemaError(f"{where}: columns {table.schema.names}, expected {list(TEXT_COLUMNS)}")
    check_schema(table.schema, text_schema(_matrix_width(table, "emb", where)), where)
    _unique_ids(table.column("utt_id").to_pylist(), where)
    ids = table.column("token_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    emb = table.column("emb").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    for i in np.nonzero((ids != emb) | (ids == 0))[0]:
        u = table.column("utt_id")[int(i)].as_py()
        raise SchemaError(f"{where}: utt_id {u!r}: {ids[i]} token ids but {emb[i]} embeddings")
    return table


def validate_s3(table: pa.Table, where: str = "s3 targets") -> pa.Table:
    check_schema(table.schema, S3, where)
    meta = table.schema.metadata or {}
    if b"targets" not in meta or b"vocab_size" not in meta:
        raise SchemaError(f"{where}: metadata must name the targets' tokenizer and vocab_size")
    _unique_ids(table.column("utt_id").to_pylist(), where)
    vocab = int(meta[b"vocab_size"])
    n = table.column("num_tokens").to_numpy()
    tokens = table.column("tokens").combine_chunks()
    lengths = tokens.value_lengths().to_numpy(zero_copy_only=False)
    values = tokens.flatten().to_numpy(zero_copy_only=False)
    for i in np.nonzero((lengths != n) | (n == 0))[0]:
        raise SchemaError(f"{where}: utt_id {table.column('utt_id')[int(i)].as_py()!r}: "
                          f"{lengths[i]} tokens, num_tokens says {n[i]}")
    if len(values) and (values.min() < 0 or values.max() >= vocab):
        raise SchemaError(f"{where}: token ids outside [0, {vocab})")
    return table


def validate_codes(table: pa.Table, where: str = "taste codes") -> pa.Table:
    if list(table.schema.names) != list(CODES_COLUMNS):
        raise SchemaError(f"{where}: columns {table.schema.names}, expected {list(CODES_COLUMNS)}")
    t = table.schema.field("codes").type
    if not (pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type)):
        raise SchemaError(f"{where}: column 'codes' has type {t}, expected list<fixed_size_list<int32>>")
    levels = t.value_type.list_size
    check_schema(table.schema, codes_schema(levels), where)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = [k for k in CODES_META if k not in meta]
    if missing:
        raise SchemaError(f"{where}: metadata lacks {missing}")
    rvq_levels, duration_bits = int(meta["rvq_levels"]), int(meta.get("duration_bits", 0))
    if rvq_levels + (duration_bits > 0) != levels:
        raise SchemaError(f"{where}: {levels} codes per token, the metadata says rvq_levels {rvq_levels}"
                          + (f" and a duration code of {duration_bits} bits" if duration_bits else ""))
    _unique_ids(table.column("utt_id").to_pylist(), where)
    ids = table.column("token_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    codes = table.column("codes").combine_chunks()
    n = codes.value_lengths().to_numpy(zero_copy_only=False)
    for i in np.nonzero((ids != n) | (ids == 0))[0]:
        raise SchemaError(f"{where}: utt_id {table.column('utt_id')[int(i)].as_py()!r}: {ids[i]} token ids but {n[i]} rows of codes")
    values = codes.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, levels)
    size = int(meta["rvq_codebook_size"])
    rvq, durations = values[:, :rvq_levels], values[:, rvq_levels:]
    if rvq.size and (rvq.min() < 0 or rvq.max() >= size):
        raise SchemaError(f"{where}: codes outside [0, {size})")
    if durations.size and (durations.min() < 0 or durations.max() >= 2**duration_bits):
        raise SchemaError(f"{where}: durations outside [0, {2**duration_bits}) frames")
    return table


def validate_speaker(table: pa.Table, where: str = "speaker embeddings") -> pa.Table:
    if list(table.schema.names) != list(SPEAKER_COLUMNS):
        raise SchemaError(f"{where}: columns {table.schema.names}, expected {list(SPEAKER_COLUMNS)}")
    t = table.schema.field("emb").type
    if not (pa.types.is_fixed_size_list(t) and t.value_type == pa.float32()):
        raise SchemaError(f"{where}: column 'emb' has type {t}, expected fixed_size_list<float>")
    check_schema(table.schema, speaker_schema(t.list_size), where)
    if b"speaker.source" not in (table.schema.metadata or {}):
        raise SchemaError(f"{where}: metadata must name the speaker encoder (speaker.source)")
    _unique_ids(table.column("utt_id").to_pylist(), where)
    values = table.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values.reshape(-1, t.list_size)).all(1) if len(values) else np.zeros(0, bool)
    if bad.any():
        raise SchemaError(f"{where}: utt_id {table.column('utt_id')[int(np.argmax(bad))].as_py()!r}: "
                          "embedding is not finite")
    return table


def validate_free_units(table: pa.Table, where: str = "free-running units") -> pa.Table:
    check_schema(table.schema, FREE_UNITS, where)
    meta = table.schema.metadata or {}
    missing = [k for k in FREE_UNITS_META if k.encode() not in meta]
    if missing:
        raise SchemaError(f"{where}: metadata lacks {missing}")
    pairs = list(zip(table.column("utt_id").to_pylist(), table.column("source").to_pylist()))
    if len(set(pairs)) != len(pairs):
        raise SchemaError(f"{where}: an (utt_id, source) pair appears twice")
    return table


def validate_words(table: pa.Table, where: str = "word timings") -> pa.Table:
    check_schema(table.schema, WORDS, where)
    _unique_ids(table.column("utt_id").to_pylist(), where)
    for u, words, start, end in zip(*(table.column(c).to_pylist() for c in ("utt_id", "words", "start", "end"))):
        s, e = np.asarray(start), np.asarray(end)
        if not len(words) == len(s) == len(e):
            raise SchemaError(f"{where}: utt_id {u!r}: {len(words)} words, {len(s)} starts and {len(e)} ends")
        if (e < s).any() or (np.diff(s) < 0).any() or (len(s) and s[0] < 0):
            raise SchemaError(f"{where}: utt_id {u!r}: word times must start at 0 or later, rise, and end after they start")
    return table


def read_manifest(path: str | os.PathLike) -> pa.Table:
    return validate_manifest(pq.read_table(path), str(path))


def read_rejects(path: str | os.PathLike) -> pa.Table:
    return validate_rejects(pq.read_table(path), str(path))


def read_repairs(path: str | os.PathLike) -> pa.Table:
    return validate_repairs(pq.read_table(path), str(path))


def read_whisper(path: str | os.PathLike) -> pa.Table:
    return validate_whisper(pq.read_table(path), str(path))


def read_s3(path: str | os.PathLike) -> pa.Table:
    return validate_s3(pq.read_table(path), str(path))


def read_text(path: str | os.PathLike) -> pa.Table:
    return validate_text(pq.read_table(path), str(path))


def read_speaker(path: str | os.PathLike) -> pa.Table:
    return validate_speaker(pq.read_table(path), str(path))


def read_free_units(path: str | os.PathLike) -> pa.Table:
    return validate_free_units(pq.read_table(path), str(path))


def read_words(path: str | os.PathLike) -> pa.Table:
    return validate_words(pq.read_table(path), str(path))


def read_codes(path: str | os.PathLike) -> pa.Table:
    return validate_codes(pq.read_table(path), str(path))


# ---------------------------------------------------------------------------------------------
# Matrices in and out of Arrow


def matrix_column(mats: list[np.ndarray], width: int) -> pa.Array:
    """List of (frames x width) arrays -> Arrow list<fixed_size_list<float16>> column."""
    offsets = np.zeros(len(mats) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([m.shape[0] for m in mats])
    for m in mats:
        if m.ndim != 2 or m.shape[1] != width:
            raise ValueError(f"expected (frames, {width}) matrix, got {m.shape}")
    flat = np.concatenate([m.astype(np.float16).reshape(-1) for m in mats]) if mats else np.zeros(0, np.float16)
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), width)
    return pa.ListArray.from_arrays(pa.array(offsets), rows)


def code_column(rows: list[np.ndarray], levels: int) -> pa.Array:
    """List of (tokens x levels) integer arrays -> Arrow list<fixed_size_list<int32>> column."""
    for r in rows:
        if r.ndim != 2 or r.shape[1] != levels:
            raise ValueError(f"expected (tokens, {levels}) codes, got {r.shape}")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([r.shape[0] for r in rows])
    flat = np.concatenate([r.astype(np.int32).reshape(-1) for r in rows]) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), levels))


def row_matrix(table: pa.Table, column: str, i: int) -> np.ndarray:
    """Row ``i`` of a matrix column as a (frames x width) float16 array."""
    scalar = table.column(column)[i]
    width = table.schema.field(column).type.value_type.list_size
    flat = scalar.values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width)


def matrix_rows(table: pa.Table, column: str) -> list[np.ndarray]:
    """Every row of a matrix column as a (frames x width) array, each a view of one flat array: a row
    group's matrices without a Python object per row on the Arrow side (``row_matrix`` per row costs
    about as much as reading the row group)."""
    arr = table.column(column).combine_chunks()
    width = arr.type.value_type.list_size
    offsets = arr.offsets.to_numpy()
    flat = arr.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return [flat[offsets[r] : offsets[r + 1]] for r in range(len(arr))]  # offsets index ``values`` as stored
