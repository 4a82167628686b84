"""The data layer: a split joined lazily from its Parquet tables, batches within a bounded buffer."""

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from taste_pipeline import data, tables, train
from test_train import _examples, _Grouped, _model


def test_lazy_split_gives_what_the_tables_hold(tiny_tables):
    split, meta = data.load_split(**tiny_tables)
    w, t = tables.read_whisper(tiny_tables["whisper_path"]), tables.read_text(tiny_tables["text_path"])
    s = tables.read_s3(tiny_tables["s3_path"])
    ex = split.examples(range(len(split)))
    for i, u in enumerate(split.utt_ids):
        e = ex[i]
        np.testing.assert_array_equal(e.mid.numpy(), tables.row_matrix(w, "mid", w.column("utt_id").to_pylist().index(u)))
        np.testing.assert_array_equal(e.text_emb.numpy(), tables.row_matrix(t, "emb", t.column("utt_id").to_pylist().index(u)))
        assert e.units.tolist() == s.column("tokens")[s.column("utt_id").to_pylist().index(u)].as_py()
    assert split.widths == (384, 384) and meta["vocab_size"] == "8"
    sp = tables.read_speaker(tiny_tables["speaker_path"])
    emb = dict(zip(sp.column("utt_id").to_pylist(), sp.column("emb").to_pylist()))
    for i, u in enumerate(split.utt_ids):
        np.testing.assert_array_equal(split.speaker(i), emb[u])
    without, _ = data.load_split(**dict(tiny_tables, speaker_path=None))
    with pytest.raises(ValueError, match="without its speaker table"):
        without.speaker(0)


def test_a_bad_row_group_is_named_when_it_is_read(tiny_tables, tmp_path):
    w = pq.read_table(tiny_tables["whisper_path"])
    frames = w.column("num_frames").to_pylist()
    frames[5] += 1  # row 5 is in the second row group of 4
    bad = w.set_column(1, "num_frames", pa.array(frames, pa.int32()))
    pq.write_table(bad, tmp_path / "w.parquet", row_group_size=4)
    split, _ = data.load_split(**dict(tiny_tables, whisper_path=tmp_path / "w.parquet"))
    split.examples([0])  # the first row group is fine
    with pytest.raises(tables.SchemaError, match=r"w.parquet row group 1: utt_id .* frames"):
        split.examples([5])


def _flat(plan):
    return [g for window in plan for g in window]


def test_a_split_that_fits_the_buffer_is_sorted_whole():
    """With the whole subset in the buffer the batches are the global length sort, shuffled: the
    batches every earlier result was trained with."""
    sub = data.as_subset(_examples(n=40))
    plan = data.batches(sub, 4, random.Random(3), buffer_rows=40)
    order = sorted(range(40), key=lambda i: (sub.source.num_units(i), sub.source.utt_ids[i]))
    want = [order[i : i + 4] for i in range(0, 40, 4)]
    random.Random(3).shuffle(want)
    assert plan == [want]


def test_a_small_buffer_keeps_windows_small_and_covers_every_utterance_once():
    src = _Grouped(_examples(n=40))
    plan = data.batches(data.as_subset(src), 4, random.Random(1), buffer_rows=12)
    assert len(plan) > 1 and all(sum(len(g) for g in window) <= 12 + 5 for window in plan)
    seen = [i for g in _flat(plan) for i in g]
    assert sorted(seen) == list(range(40))
    for window in plan:  # every window is made of whole row groups
        ids = {i for g in window for i in g}
        assert all({j for j in range(40) if j // 6 == i // 6} <= ids for i in ids)
    assert plan == data.batches(data.as_subset(src), 4, random.Random(1), buffer_rows=12)  # deterministic
    assert plan != data.batches(data.as_subset(src), 4, random.Random(2), buffer_rows=12)


def test_the_loader_holds_one_window_and_each_rank_its_share():
    src = _Grouped(_examples(n=40))
    plan = data.batches(data.as_subset(src), 5, random.Random(1), buffer_rows=12)
    loaded = []
    real = src.examples
    src.examples = lambda idx: loaded.append(sorted(idx)) or real(idx)
    loaders = [data.Loader(src, plan, rank, 2) for rank in (0, 1)]
    for b, group in enumerate(loaders[0].groups):
        shares = [[e.utt_id for e in ld.get(b)] for ld in loaders]
        if len(group) > 1:
            assert sorted(shares[0] + shares[1]) == sorted(src.utt_ids[i] for i in group)
    assert len(loaded) == 2 * len(plan)  # one read per window and rank
    assert max(len(x) for x in loaded) <= (12 + 5) // 2 + 3  # a rank reads about half a window


def test_predictions_do_not_depend_on_the_buffer():
    model = _model()
    ex = _Grouped(_examples(n=30))
    whole = train.predict(model, ex, 4, buffer_rows=0)
    small = train.predict(model, ex, 4, buffer_rows=7)
    assert len(whole) == len(small) == 30
    for a, b in zip(whole, small):  # other batch mates, other padding: equal up to float rounding
        np.testing.assert_allclose(a["nll"], b["nll"], rtol=1e-4, atol=1e-5)
        assert np.array_equal(a["target"], b["target"])


def test_training_with_a_small_buffer_learns(tmp_path):
    from taste_pipeline.train_params import Train

    tr, va = data.speaker_split(_Grouped(_examples(n=30)), 1, seed=0)
    cfg = Train(lr=3e-3, epochs=4, batch_size=4, warmup_steps=2, patience=10, amp=False, seed=0, buffer_rows=8)
    h = train.fit(_model(), tr, va, cfg, tmp_path)["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert torch.tensor([r["val_nll"] for r in h]).isfinite().all()


def _small_groups(files: dict, tmp_path) -> dict:
    """The tiny tables with row groups of 2, so a small buffer makes several windows."""
    out = dict(files)
    for key in ("whisper_path", "text_path"):
        out[key] = tmp_path / f"{key}.parquet"
        pq.write_table(pq.read_table(files[key]), out[key], row_group_size=2)
    return out


def test_workers_read_ahead_and_give_the_same_batches(tiny_tables, tmp_path):
    """DataLoader workers (reading Parquet through their own handles) give every batch exactly as the
    main process does, also when a resumed epoch starts mid-plan."""
    split, _ = data.load_split(**_small_groups(tiny_tables, tmp_path))
    sub = data.as_subset(split)
    plan = data.batches(sub, 1, random.Random(3), buffer_rows=2)
    assert len(plan) > 2
    plain, ahead = data.Loader(sub, plan), data.Loader(sub, plan, workers=2)

    def same(b):
        for x, y in zip(plain.get(b), ahead.get(b), strict=True):
            assert x.utt_id == y.utt_id
            assert torch.equal(x.mid, y.mid) and torch.equal(x.text_emb, y.text_emb) and torch.equal(x.units, y.units)

    for b in range(len(plain)):
        same(b)
    start = len(plan[0]) + 1  # inside the second window: a new stream from there
    resumed = data.Loader(sub, plan, workers=1)
    for b in range(start, len(plain)):
        for x, y in zip(plain.get(b), resumed.get(b), strict=True):
            assert x.utt_id == y.utt_id and torch.equal(x.last, y.last)


def test_training_with_workers_is_the_training_without(tiny_tables, tmp_path):
    from taste_pipeline.train_params import Train

    split, meta = data.load_split(**_small_groups(tiny_tables, tmp_path))
    tr, va = data.speaker_split(split, 1, seed=0)
    runs = []
    for workers in (0, 2):
        cfg = Train(lr=3e-3, epochs=2, batch_size=2, warmup_steps=1, patience=10, amp=False, seed=0, buffer_rows=2,
                    num_workers=workers, agg_init="fresh", d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1)
        model = train.build_model(int(meta["vocab_size"]), *split.widths, cfg, None)
        runs.append(train.fit(model, tr, va, cfg, tmp_path / str(workers))["history"])
    assert runs[0] == runs[1]
