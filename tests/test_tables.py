import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taste_pipeline import tables


def _whisper_table(frames=(3, 5), width=4, n_override=None):
    mats = [np.random.default_rng(i).standard_normal((f, width)) for i, f in enumerate(frames)]
    return pa.Table.from_pydict({
        "utt_id": [f"u{i}" for i in range(len(frames))],
        "num_frames": list(n_override or frames),
        "mid": tables.matrix_column(mats, width),
        "last": tables.matrix_column(mats, width),
    }, schema=tables.whisper_schema(width, width)), mats


def test_matrix_round_trip_through_parquet(tmp_path):
    table, mats = _whisper_table()
    pq.write_table(table, tmp_path / "w.parquet")
    back = tables.read_whisper(tmp_path / "w.parquet")
    for i, m in enumerate(mats):
        np.testing.assert_array_equal(tables.row_matrix(back, "last", i), m.astype(np.float16))


def test_matrix_rows_are_every_rows_matrix_of_any_row_group(tmp_path):
    """``matrix_rows`` (the training reader's) agrees with ``row_matrix`` row by row, in a row group
    that is not the file's first and in a column read as several chunks."""
    table, mats = _whisper_table(frames=(3, 5, 0, 7, 2))
    tables.write_table(tmp_path / "w.parquet", table, table.schema, rows_per_group=2)
    f = pq.ParquetFile(tmp_path / "w.parquet")
    group = f.read_row_group(1)
    assert [m.shape for m in tables.matrix_rows(group, "mid")] == [(0, 4), (7, 4)]
    whole = pq.read_table(tmp_path / "w.parquet")
    assert whole.column("mid").num_chunks > 1
    for i, m in enumerate(tables.matrix_rows(whole, "mid")):
        np.testing.assert_array_equal(m, tables.row_matrix(whole, "mid", i))
        np.testing.assert_array_equal(m, mats[i].astype(np.float16))


def test_float_matrices_are_written_without_dictionary_pages(tmp_path):
    """Dictionary pages make float16 matrices several times slower to read (bench/read.py): the
    pipeline's writers keep them for ids and counts only."""
    table, _ = _whisper_table()
    tables.write_table(tmp_path / "a.parquet", table, table.schema)
    with tables.TableWriter(tmp_path / "b.parquet", table.schema) as w:
        w.write(table.to_pydict())
    with tables.TableWriter(tmp_path / "c.parquet", table.schema, partial_dir=tmp_path / "parts") as w:
        w.write(table.to_pydict(), 0)
    for name in "abc":
        meta = pq.ParquetFile(tmp_path / f"{name}.parquet").metadata.row_group(0)
        dictionary = {meta.column(i).path_in_schema: meta.column(i).has_dictionary_page for i in range(meta.num_columns)}
        assert dictionary == {"utt_id": True, "num_frames": True, "mid.list.element.list.element": False,
                              "last.list.element.list.element": False}, (name, dictionary)


def test_frame_count_mismatch_names_the_utterance():
    table, _ = _whisper_table(n_override=(3, 6))
    with pytest.raises(tables.SchemaError, match="u1"):
        tables.validate_whisper(table)


def test_manifest_schema_is_checked_on_read(tmp_path):
    bad = pa.table({"utt_id": ["a"], "text": ["X"]})
    pq.write_table(bad, tmp_path / "m.parquet")
    with pytest.raises(tables.SchemaError, match="missing column 'speaker_id'"):
        tables.read_manifest(tmp_path / "m.parquet")
    rows = dict(utt_id=["a", "a"], speaker_id=["1", "1"], chapter_id=["2", "2"], text=["X", "Y"],
                num_samples=[16000, 16000], duration=[1.0, 1.0], audio_path=["a.flac", "b.flac"])
    with pytest.raises(tables.SchemaError, match="'a' appears more than once"):
        tables.validate_manifest(pa.Table.from_pydict(rows, schema=tables.MANIFEST))
    rows.update(utt_id=["a", "b"], duration=[1.0, 2.0])
    with pytest.raises(tables.SchemaError, match="'b': duration disagrees"):
        tables.validate_manifest(pa.Table.from_pydict(rows, schema=tables.MANIFEST))


def test_wrong_column_type_is_refused():
    t = pa.table({"utt_id": ["a"], "path": ["p"], "reason": [3]})
    with pytest.raises(tables.SchemaError, match="'reason' has type int64"):
        tables.validate_rejects(t)


def test_interrupted_writer_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "out.parquet"
    table, _ = _whisper_table()
    with pytest.raises(RuntimeError):
        with tables.TableWriter(dest, table.schema) as w:
            w.write(table.to_pydict() | {"mid": table.column("mid").combine_chunks(),
                                         "last": table.column("last").combine_chunks()})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_rewrite(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with tables.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert dest.read_text() == "old" and list(tmp_path.iterdir()) == [dest]


def test_rejects_and_repairs_must_say_what_happened():
    for schema, col, check in ((tables.REJECTS, "reason", tables.validate_rejects),
                               (tables.REPAIRS, "repair", tables.validate_repairs)):
        good = pa.Table.from_pydict({"utt_id": ["a"], "path": ["x.flac"], col: ["peak 1.2"]}, schema=schema)
        assert check(good) is good
        with pytest.raises(tables.SchemaError, match=f"x.flac.*does not say {col}"):
            check(pa.Table.from_pydict({"utt_id": ["a"], "path": ["x.flac"], col: [""]}, schema=schema))
