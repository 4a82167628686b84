import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from taste_pipeline import checkpoint, data, train
from taste_pipeline.train_params import Train
from taste_pipeline.model import ModelConfig, TasteModel


def _examples(n=24, speakers=4, seed=0):
    """Synthetic utterances: units count up cyclically from a start read off the speech."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L, Fr = 4 + i % 3, 20 + i % 5
        mid = torch.randn(Fr, 384, generator=g)
        units = (mid[0, :8].argmax() + torch.arange(Fr)) % 8
        out.append(data.Example(f"{i % speakers}-0-{i:04d}", str(i % speakers), "x", np.arange(L),
                                 torch.randn(L, 384, generator=g).half(), mid.half(), mid.half(), units,
                                 speaker=torch.randn(256, generator=torch.Generator().manual_seed(i % speakers))))
    return out


class _Grouped(data.InMemory):
    """An in-memory source whose utterances sit in row groups of 6 (as a Parquet split would)."""

    def row_group(self, i):
        return i // 6


def _model(speech="tokens"):
    torch.manual_seed(0)
    return TasteModel(ModelConfig(speech=speech, vocab_size=8, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                                  agg_layers=1, agg_heads=2, agg_ffn=64, dropout=0.0))


def test_a_tiny_training_run_lowers_the_loss(tmp_path):
    ex = _examples()
    tr, va = data.speaker_split(ex, 1, seed=0)
    cfg = Train(lr=3e-3, epochs=6, batch_size=4, warmup_steps=2, patience=10, amp=False, seed=0)
    summary = train.fit(_model(), tr, va, cfg, out_dir=tmp_path)
    h = summary["history"]
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert summary["best"]["val_nll"] == min(r["val_nll"] for r in h)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "history.json").exists()


def test_training_is_deterministic_and_checkpoints_round_trip(tmp_path):
    ex = _examples()
    tr, va = data.speaker_split(ex, 1, seed=0)
    cfg = Train(lr=3e-3, epochs=2, batch_size=4, warmup_steps=2, amp=False, seed=5)
    runs = []
    for name in ("a", "b"):
        m = _model()
        train.fit(m, tr, va, cfg, out_dir=tmp_path / name)
        runs.append(train.predict(checkpoint.load_checkpoint(tmp_path / name)[0], va, 4))
    for p, q in zip(*runs):
        np.testing.assert_array_equal(p["nll"], q["nll"])


def test_validation_speakers_are_disjoint_from_training():
    tr, va = data.speaker_split(_examples(), 1, seed=3)
    spk = lambda s: {s.source.speaker_ids[i] for i in s.indices}  # noqa: E731
    assert spk(tr).isdisjoint(spk(va))
    assert len(tr) + len(va) == 24 and len(spk(va)) == 1
    with pytest.raises(ValueError, match="train.val_speakers"):
        data.speaker_split(_examples(), 4, seed=3)


def test_collate_can_borrow_speech_from_other_utterances():
    ex = _examples(4)
    b = data.collate(ex[:2], speech_from=[ex[3], ex[2]])
    assert int(b["frame_len"][0]) == len(ex[3].mid)
    torch.testing.assert_close(b["mid"][1, : len(ex[2].mid)], ex[2].mid.float())
    torch.testing.assert_close(b["text_emb"][0, : len(ex[0].text_emb)], ex[0].text_emb.float())


def test_load_split_names_a_missing_utterance(tiny_tables, tmp_path):
    split, meta = data.load_split(**tiny_tables)
    assert len(split) == 8 and meta["vocab_size"] == "8"
    ex = split.examples(range(8)).values()
    assert all(len(e.units) == len(e.mid) for e in ex)  # both 50 Hz, ceil(n / 320)
    t = pq.read_table(tiny_tables["text_path"])
    pq.write_table(t.slice(1), tmp_path / "t2.parquet")
    with pytest.raises(ValueError, match=f"text table lacks utterance {t.column('utt_id')[0].as_py()}"):
        data.load_split(**dict(tiny_tables, text_path=tmp_path / "t2.parquet"))


def test_initial_weights_follow_the_training_seed():
    p = Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh", seed=3)
    a, b = (train.build_model(8, 384, 384, p, None).state_dict() for _ in range(2))
    c = train.build_model(8, 384, 384, Train(**{**p.__dict__, "seed": 4}), None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("width", [384, 512, 768, 1024, 1280])
def test_fresh_aggregator_takes_whisper_shapes_for_every_width(width):
    """agg_init: fresh works for every Whisper width (64-wide heads, FFN 4x), not only those divisible by 6."""
    p = Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh")
    model = train.build_model(8, width, width, p, None)
    assert model.cfg.agg_heads == width // 64 and model.cfg.agg_ffn == 4 * width
    ex = _examples(n=2)
    for e in ex:
        e.text_emb, e.mid, e.last = (torch.randn(len(t), width).half() for t in (e.text_emb, e.mid, e.last))
    logits, losses = model(data.collate(ex))
    assert torch.isfinite(losses["loss"])


def test_fresh_aggregator_refuses_a_width_it_cannot_split_naming_the_param():
    p = Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh")
    with pytest.raises(ValueError, match="train.agg_init.*whisper.model.*100"):
        train.build_model(8, 100, 100, p, None)


def test_a_finetuned_variant_starts_from_the_other_checkpoint(tmp_path):
    """text_only -> taste: the shared decoder starts trained, what only taste has starts fresh."""
    p = Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh", seed=1)
    first = train.build_model(8, 384, 384, dataclasses.replace(p, speech="none"), None)
    with torch.no_grad():
        for t in first.parameters():
            t.add_(1.0)
    checkpoint.save_checkpoint(first, tmp_path / "text_only", {})
    fresh = train.build_model(8, 384, 384, p, None)
    second = train.build_model(8, 384, 384, p, None)
    got = train.init_from(second, tmp_path / "text_only")
    theirs, ours, before = first.state_dict(), second.state_dict(), fresh.state_dict()
    assert got["copied"] and got["fresh"] and set(got["copied"]) | set(got["fresh"]) == set(ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in got["copied"])
    assert all(torch.equal(ours[k], before[k]) for k in got["fresh"])
    assert any(k.startswith("speech.aggregator.") for k in got["fresh"]) and "decoder.head.weight" in got["copied"]
    wider = train.build_model(8, 384, 384, Train(d_model=64, n_heads=2, n_layers=1, d_ff=64, agg_layers=1,
                                                          agg_init="fresh"), None)
    with pytest.raises(ValueError, match="shapes differ"):
        train.init_from(wider, tmp_path / "text_only")


def test_prepare_reads_only_the_tables_a_variant_uses(tiny_tables, tmp_path):
    """train.prepare (the train stage's and scripts/scaling_direct.py's way to a model): the speaker table
    is read, and names the resume state, only for speaker: embedding; asked for and missing, it is an
    error naming the param; the validation speakers follow base.seed, not train.seed."""
    tables = {k[: -len("_path")]: v for k, v in tiny_tables.items()}
    p = Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh", speech="none",
              speaker="none", val_speakers=1, seed=1)
    alone = train.prepare("text_only", p, {k: v for k, v in tables.items() if k != "speaker"}, None, 0)
    told = train.prepare("text_only", dataclasses.replace(p, speaker="embedding"), tables, None, 0)
    assert alone.meta["vocab_size"] == told.meta["vocab_size"] and alone.init is None
    assert alone.model.cfg.speaker == "none" and told.model.cfg.speaker == "embedding"
    assert alone.fingerprint != told.fingerprint
    assert train.prepare("text_only", p, tables, None, 0).fingerprint == alone.fingerprint  # given, not read
    with pytest.raises(ValueError, match="train.speaker: embedding"):
        train.prepare("text_only", dataclasses.replace(p, speaker="embedding"), {**tables, "speaker": None}, None, 0)
    with pytest.raises(FileNotFoundError, match="train.unit_alignment: oracle"):
        train.prepare("text_only", dataclasses.replace(p, unit_alignment="oracle"), tables, None, 0)
    other_seed = train.prepare("text_only", dataclasses.replace(p, seed=2), tables, None, 0)
    assert other_seed.val_ex.indices == alone.val_ex.indices
    checkpoint.save_checkpoint(alone.model, tmp_path / "text_only", {})
    ft = train.prepare("text_only_ft", p, tables, None, 0, tmp_path / "text_only")
    assert ft.init["copied"] and not ft.init["fresh"]


def test_the_schedule_spans_every_step_windowed_batching_takes(tmp_path):
    """With buffer_rows under the split, each window ends in a short batch: more steps than ceil(N / batch)
    per epoch. The cosine must reach its floor at the last step, not bottom out before it."""
    ex = _examples(n=40, speakers=4)
    tr, va = data.speaker_split(_Grouped(ex), 1, seed=0)
    cfg = Train(lr=1e-3, epochs=3, batch_size=3, warmup_steps=2, patience=10, amp=False, seed=0, buffer_rows=7)
    lrs = []

    class Live:
        def log_metric(self, name, value):
            if name == "train/lr":
                lrs.append(value)

        def next_step(self):
            pass

    summary = train.fit(_model(), tr, va, cfg, out_dir=tmp_path, live=Live())
    assert summary["steps"] == len(lrs) == train.planned_steps(tr, cfg) > 3 * -(-len(tr) // 3)
    assert lrs[-1] == pytest.approx(train.lr_at(len(lrs) - 1, len(lrs), cfg))
    assert lrs[-2] > lrs[-1] > 0.1 * cfg.lr  # still decaying at the end: the floor is reached after the last step


def test_codebooks_start_from_a_sample_of_the_whole_split_not_its_shortest_utterances(monkeypatch):
    """Each utterance's speech vectors here are its text length: the k-means sample must hold long
    utterances as well as short ones, drawn with the seed."""
    g = torch.Generator().manual_seed(0)
    ex = [data.Example(f"0-0-{i:04d}", "0", "x", np.arange(n), torch.full((n, 384), float(n)).half(),
                       torch.randn(8, 384, generator=g).half(), torch.randn(8, 384, generator=g).half(),
                       torch.zeros(8, dtype=torch.long), torch.ones(256)) for i, n in enumerate(range(1, 101))]
    torch.manual_seed(0)
    model = TasteModel(ModelConfig(speech="tokens", squeeze="rvq", vocab_size=8, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                                   agg_layers=1, agg_heads=2, agg_ffn=64, rvq_codebook_size=32))
    monkeypatch.setattr(model.speech, "vectors", lambda batch: batch["text_emb"].float())
    seen = []
    monkeypatch.setattr(model.squeeze, "init_codebooks", lambda v: seen.append(v[:, 0].clone()))
    cfg = Train(batch_size=8, amp=False, seed=3)
    assert train.init_codebooks(model, ex, cfg) == 8 * 32
    lengths = seen[0]
    assert len(lengths) == 256 and lengths.max() > 60 and lengths.mean() > 30  # the 22 shortest hold 253 tokens
    assert lengths.tolist() != train.codebook_sample(ex, 256, seed=4).indices
    assert train.codebook_sample(ex, 256, seed=3).indices == train.codebook_sample(ex, 256, seed=3).indices
