"""The speaker stage (Resemblyzer offline, CAM++ through ModelScope or a path), its table, the decoder's
speaker input and the leak control that evaluation runs."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from taste_pipeline import data, speaker, tables, train
from taste_pipeline.model import ModelConfig, TasteModel
from taste_pipeline.train_params import Train


def test_embeddings_tell_the_speakers_apart_and_repeat(tiny_tables, tmp_path):
    t = tables.read_speaker(tiny_tables["speaker_path"])
    assert t.schema.metadata[b"speaker.source"] == b"pypi:resemblyzer"
    emb = np.array(t.column("emb").to_pylist())
    spk = np.array([u.split("-")[0] for u in t.column("utt_id").to_pylist()])
    assert emb.shape == (len(spk), 256) and len(set(spk)) == 2
    cos = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    same, other = spk[:, None] == spk[None], ~np.eye(len(spk), dtype=bool)
    assert cos[same & other].mean() > cos[~same].mean() + 0.05
    again = tmp_path / "again.parquet"
    speaker.embed_split(tiny_tables["manifest_path"], again, speaker.RESEMBLYZER, rows_per_group=256)
    assert tables.read_speaker(again).column("emb").to_pylist() == t.column("emb").to_pylist()
    # Other row groups batch the partial windows otherwise: the same embeddings up to float rounding.
    speaker.embed_split(tiny_tables["manifest_path"], again, speaker.RESEMBLYZER, rows_per_group=2)
    np.testing.assert_allclose(tables.read_speaker(again).column("emb").to_pylist(), emb, atol=1e-6)


def test_batched_embeddings_are_resemblyzers_own(tiny_tables):
    from resemblyzer import preprocess_wav

    from taste_pipeline import audio

    root = tiny_tables["manifest_path"].parent
    rows = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[:3]
    wavs = [audio.load_utterance(root, r) for r in rows]
    enc = speaker.Resemblyzer()
    enc.max_partials = 5  # several forward passes, one of them across utterances
    got = enc.embed_many(wavs)
    for w, g in zip(wavs, got):
        np.testing.assert_allclose(g, enc.encoder.embed_utterance(preprocess_wav(w)), atol=1e-6)
        np.testing.assert_allclose(enc.embed(w), g, atol=1e-6)


def _campplus_like(path, width=192, seed=0):
    """An ONNX file in campplus.onnx's layout (input (1, frames, 80) fbank, output (1, width)) with random
    weights: max over time, then a matrix."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((80, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["input"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["embedding"])],
        "campplus_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, width])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return w


def test_campplus_reads_cosyvoice_features_from_modelscope_or_a_path(tiny_tables, tmp_path, monkeypatch):
    import modelscope
    import torchaudio

    folder = tmp_path / "snapshot"
    folder.mkdir()
    w = _campplus_like(folder / speaker.CAMPPLUS_FILE)
    asked = {}

    def snapshot_download(model_id, allow_patterns=None):
        asked.update(model_id=model_id, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(modelscope, "snapshot_download", snapshot_download)
    assert speaker.campplus_path("modelscope:iic/CosyVoice-300M") == folder / speaker.CAMPPLUS_FILE
    assert asked == {"model_id": "iic/CosyVoice-300M", "allow_patterns": [speaker.CAMPPLUS_FILE]}
    out = tmp_path / "spk.parquet"
    speaker.embed_split(tiny_tables["manifest_path"], out, str(folder / speaker.CAMPPLUS_FILE))
    t = tables.read_speaker(out)
    assert t.schema.field("emb").type.list_size == 192
    # CosyVoice's frontend: 80-bin Kaldi fbank without dither, minus its mean over the utterance.
    row = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[0]
    from taste_pipeline import audio

    x = torch.from_numpy(audio.load_utterance(tiny_tables["manifest_path"].parent, row))[None]
    feat = torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80, dither=0, sample_frequency=16000)
    want = (feat - feat.mean(0, keepdim=True)).numpy().max(0) @ w
    np.testing.assert_allclose(t.column("emb")[0].as_py(), want, rtol=1e-4, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="campplus.onnx"):
        speaker.load(str(tmp_path / "missing.onnx"))


def test_speaker_table_is_checked():
    good = pa.Table.from_pydict({"utt_id": ["a", "b"], "emb": [[0.0, 1.0], [1.0, 0.0]]}, schema=tables.speaker_schema(2))
    tables.validate_speaker(good.replace_schema_metadata({"speaker.source": "x"}))
    with pytest.raises(tables.SchemaError, match="metadata must name"):
        tables.validate_speaker(good)
    nan = pa.Table.from_pydict({"utt_id": ["a"], "emb": [[0.0, float("nan")]]}, schema=tables.speaker_schema(2))
    with pytest.raises(tables.SchemaError, match="'a': embedding is not finite"):
        tables.validate_speaker(nan.replace_schema_metadata({"speaker.source": "x"}))


def _model(speaker_part):
    torch.manual_seed(0)
    return TasteModel(ModelConfig(speech="none", speaker=speaker_part, vocab_size=8, d_model=32, n_heads=2,
                                  n_layers=1, d_ff=64, d_speaker=4)).eval()


def test_the_decoder_reads_the_speaker_embedding_first_only_when_told():
    g = torch.Generator().manual_seed(0)
    batch = {"text_emb": torch.randn(2, 5, 384, generator=g), "text_len": torch.tensor([5, 3]),
             "units": torch.randint(0, 8, (2, 6), generator=g), "unit_len": torch.tensor([6, 4]),
             "speaker": torch.randn(2, 4, generator=g)}
    told, blind = _model("embedding"), _model("none")
    other = dict(batch, speaker=batch["speaker"].flip(0))
    assert not torch.allclose(told(other)[0][0], told(batch)[0][0])
    torch.testing.assert_close(blind(other)[0], blind(batch)[0])
    # Only its direction counts (CosyVoice normalises it), and a batch without one is refused.
    torch.testing.assert_close(told(dict(batch, speaker=3 * batch["speaker"]))[0], told(batch)[0])
    with pytest.raises(ValueError, match="no speaker embeddings"):
        told({k: v for k, v in batch.items() if k != "speaker"})


def test_the_leak_control_takes_another_utterance_of_the_same_speaker():
    ids = ["a", "b", "a", "c", "a", "b"]
    other = data.same_speaker_other_utterance(ids)
    assert other == {0: 2, 2: 4, 4: 0, 1: 5, 5: 1, 3: 3}
    assert sorted(other.values()) == list(range(len(ids)))  # a permutation: every embedding used once


def test_the_leak_control_catches_an_embedding_that_says_what_was_said(tmp_path):
    """A "speaker" embedding that codes each utterance's first unit is read by the decoder: decoded with
    another utterance's embedding of the same speaker, its NLL rises; the evaluate stage reports that rise
    (``speaker_swap_delta_nll``), which for an embedding that says only who speaks stays at zero."""
    text = torch.randn(3, 384, generator=torch.Generator().manual_seed(0)).half()  # one text: nothing else to read
    ex = []
    for i in range(48):
        start = i % 4  # the next utterance of the same speaker (i + 2) starts elsewhere
        units = torch.tensor([start, start])  # short: the first unit, read off the embedding, weighs
        ex.append(data.Example(f"{i % 2}-0-{i:04d}", str(i % 2), "x", np.arange(3), text,
                               torch.zeros(1, 384).half(), torch.zeros(1, 384).half(), units,
                               speaker=torch.nn.functional.one_hot(torch.tensor(start), 4).float() + 0.1))
    p = Train(speech="none", d_model=32, n_heads=2, n_layers=1, d_ff=64, epochs=40, batch_size=8, warmup_steps=2, patience=40,
              val_speakers=1, amp=False, lr=3e-3, seed=0)
    model = train.build_model(8, 384, 384, p, None, d_speaker=4)
    train.fit(model, ex[:40], ex[40:], p, tmp_path)
    test = data.InMemory(ex[40:])
    own = train.summarize(train.predict(model, test, 8))["nll"]
    swapped = train.summarize(train.predict(model, test, 8, speaker_from=data.same_speaker_other_utterance(
        test.speaker_ids)))["nll"]
    assert swapped > own + 0.3
