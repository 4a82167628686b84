"""The shared extraction loop: groups in manifest order, resume only under the same fingerprint."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taste_pipeline import extract, tables

SCHEMA = pa.schema([("utt_id", pa.string()), ("n", pa.int32())])


def test_groups_in_manifest_order_and_resume_only_with_the_same_settings(tiny_resampled, tmp_path):
    manifest = tiny_resampled / "manifest.parquet"
    rows = tables.read_manifest(manifest).to_pylist()
    calls = []

    def encode(group_rows, audios):
        calls.append([r["utt_id"] for r in group_rows])
        assert [len(a) for a in audios] == [r["num_samples"] for r in group_rows]
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("killed")
        return {"n": [len(a) for a in audios]}

    fail_at = 2
    with pytest.raises(RuntimeError):
        extract.run("t", manifest, tmp_path / "t.parquet", SCHEMA, {"k": "v"}, {"a": 1}, encode, 3, tmp_path / "part")
    assert not (tmp_path / "t.parquet").exists()
    first = calls[0]

    # Same settings: the finished first group is not computed again.
    calls.clear()
    fail_at = None
    n = extract.run("t", manifest, tmp_path / "t.parquet", SCHEMA, {"k": "v"}, {"a": 1}, encode, 3, tmp_path / "part")
    assert n == len(rows) and first not in calls and len(calls) == -(-len(rows) // 3) - 1
    t = pq.read_table(tmp_path / "t.parquet")
    assert t.column("utt_id").to_pylist() == [r["utt_id"] for r in rows]
    assert t.column("n").to_pylist() == [r["num_samples"] for r in rows]
    assert t.schema.metadata[b"k"] == b"v"
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == len(calls) + 1

    # Other settings: leftover shards of the old ones are not reused.
    fail_at = 2
    calls.clear()
    with pytest.raises(RuntimeError):
        extract.run("t", manifest, tmp_path / "u.parquet", SCHEMA, {}, {"a": 1}, encode, 3, tmp_path / "part2")
    calls.clear()
    fail_at = None
    extract.run("t", manifest, tmp_path / "u.parquet", SCHEMA, {}, {"a": 2}, encode, 3, tmp_path / "part2")
    assert calls[0] == first


def test_rows_per_group_must_be_positive():
    with pytest.raises(ValueError, match="rows_per_group"):
        extract.row_groups(10, 0)
