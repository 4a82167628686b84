import numpy as np
import pytest
import torch

from taste_pipeline import audio, params, tables, whisper


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def states(tiny_whisper):
    return whisper.WhisperStates(tiny_whisper, whisper.load_feature_extractor(whisper.EMBEDDED, 80), None, 4)


@pytest.fixture(scope="module")
def speech(tiny_resampled):
    rows = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()
    return [audio.load_utterance(tiny_resampled, r) for r in rows[:3]]


def test_converted_weights_match_ctranslate2_on_speech(tiny_whisper, speech):
    ctranslate2 = pytest.importorskip("ctranslate2")
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    feats = ext([speech[0]], sampling_rate=16000, return_tensors="np").input_features
    ref = np.array(ctranslate2.models.Whisper(str(whisper.embedded_model_dir()), compute_type="float32")
                   .encode(ctranslate2.StorageView.from_array(feats)))
    with torch.inference_mode():
        ours = tiny_whisper.get_encoder()(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert ref.shape == ours.shape == (1, 1500, 384)
    assert _cos(ref[0], ours[0]).min() > 0.9999
    assert np.abs(ref - ours).max() / np.abs(ref).max() < 1e-4


def test_decoder_weights_converted_too(tiny_whisper):
    # The text stage uses the decoder's embedding table; it must be the tied output projection.
    emb = tiny_whisper.get_input_embeddings().weight
    assert emb.shape == (51864, 384)
    assert torch.equal(emb, tiny_whisper.proj_out.weight)
    assert emb.std() > 0.01  # not a fresh init left over


@pytest.mark.parametrize("n", [1, 319, 320, 321, 16000, 16001])
def test_num_frames_is_ceil_samples_over_320(states, n):
    mid, last = states([np.zeros(n, np.float32)])[0]
    assert mid.shape == last.shape == (tables.frames_for(n), 384)
    assert tables.frames_for(n) == -(-n // 320)


def test_mid_is_an_intermediate_layer_and_last_is_the_encoder_output(tiny_whisper, states, speech):
    x = speech[0]
    mid, last = states([x])[0]
    feats = states.extractor([x], sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        out = tiny_whisper.get_encoder()(feats, output_hidden_states=True)
    n = tables.frames_for(len(x))
    hs = [h[0, :n].numpy() for h in out.hidden_states]
    assert states.mid_layer == 2 and len(hs) == 5
    np.testing.assert_allclose(last, out.last_hidden_state[0, :n].numpy(), atol=1e-5)
    np.testing.assert_allclose(mid, hs[2], atol=1e-5)
    for other in (hs[0], hs[4], hs[3]):  # embedding output, last, and a neighbour layer differ
        assert _cos(mid, other).mean() < 0.95


@pytest.mark.parametrize("bad", [0, 4, 7, -1])
def test_mid_layer_must_be_intermediate(bad):
    with pytest.raises(ValueError, match="whisper.mid_layer"):
        whisper.check_mid_layer(bad, 4)


def test_long_input_is_encoded_in_30s_windows_and_concatenated(states, speech):
    # 65 s: two full windows and a 5 s tail; nothing is cut off.
    x = np.concatenate([np.tile(speech[0], 1 + 65 * 16000 // len(speech[0]))])[: 65 * 16000]
    mid, last = states([x])[0]
    assert last.shape == (tables.frames_for(len(x)), 384) == (3250, 384)
    w2_mid, w2_last = states([x[30 * 16000 : 60 * 16000]])[0]
    np.testing.assert_allclose(last[1500:3000], w2_last, atol=1e-4)
    tail_mid, tail_last = states([x[60 * 16000 :]])[0]
    np.testing.assert_allclose(mid[3000:], tail_mid, atol=1e-4)


def test_batched_equals_one_at_a_time(tiny_whisper, speech):
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    one = whisper.WhisperStates(tiny_whisper, ext, None, batch_size=1)(speech)
    many = whisper.WhisperStates(tiny_whisper, ext, None, batch_size=3)(speech)
    for (m1, l1), (m2, l2) in zip(one, many):
        np.testing.assert_allclose(l1, l2, atol=1e-4)
        np.testing.assert_allclose(m1, m2, atol=1e-4)


def test_stage_table_is_valid_and_float16(tiny_resampled, tmp_path):
    out = tmp_path / "w.parquet"
    n = whisper.extract_split(tiny_resampled / "manifest.parquet", out, params.Whisper(batch_size=4, rows_per_group=3))
    table = tables.read_whisper(out)
    manifest = tables.read_manifest(tiny_resampled / "manifest.parquet")
    assert n == table.num_rows == manifest.num_rows
    assert table.column("utt_id").to_pylist() == manifest.column("utt_id").to_pylist()
    assert table.schema.metadata[b"whisper.mid_layer"] == b"2"
    for i, ns in enumerate(manifest.column("num_samples").to_pylist()):
        m = tables.row_matrix(table, "mid", i)
        assert m.dtype == np.float16 and m.shape == (tables.frames_for(ns), 384)
    import pyarrow.parquet as pq
    assert pq.ParquetFile(out).num_row_groups == 3  # 8 rows streamed in groups of 3


def test_unknown_model_id_is_named():
    with pytest.raises((ValueError, OSError), match="whisper.model|not-a-model"):
        whisper.load_model("./not-a-model-folder")


def test_short_window_concatenates_windows_and_stays_close_to_30s(tiny_whisper, speech):
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    short = whisper.WhisperStates(tiny_whisper, ext, None, batch_size=4, windows_s=[2])
    x = speech[0]
    assert len(x) > 2 * 16000  # more than one 2 s window
    mid, last = short([x])[0]
    assert last.shape == (tables.frames_for(len(x)), 384)
    # The second window is encoded on its own, exactly like that slice of audio alone.
    _, w2_last = short([x[2 * 16000 : 4 * 16000]])[0]
    np.testing.assert_allclose(last[100:200], w2_last, atol=1e-4)
    # A 10 s window sees the whole utterance: states close to the 30 s window, yet not the same.
    full_mid, full_last = whisper.WhisperStates(tiny_whisper, ext, None, 4)([x])[0]
    ten_mid, ten_last = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[10])([x])[0]
    assert _cos(ten_last, full_last).mean() > 0.98 and _cos(ten_mid, full_mid).mean() > 0.98
    assert not np.allclose(ten_last, full_last, atol=1e-3)


def test_bfloat16_compute_is_faithful(tiny_whisper, speech):
    # One utterance in a 5 s window: on a CPU without native bfloat16 (emulated, ~100x slower) this
    # stays a few seconds.
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    speech = [s[:4 * 16000] for s in speech[:1]]
    ref = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[5])(speech)
    bf = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[5], dtype="bfloat16")(speech)
    for (rm, rl), (bm, bl) in zip(ref, bf):
        assert bm.dtype == np.float32 and bm.shape == rm.shape
        # Mean cosine per frame, the fidelity measure of bench/whisper.py.
        assert _cos(bm, rm).mean() > 0.999 and _cos(bl, rl).mean() > 0.999
    # The model itself is left in float32 for other users (the text stage reads its decoder).
    assert next(tiny_whisper.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kw, match", [({"windows_s": [10, 31]}, "whisper.windows_s"), ({"dtype": "int8"}, "whisper.dtype")])
def test_bad_window_or_dtype_is_named(tiny_whisper, kw, match):
    with pytest.raises(ValueError, match=match):
        whisper.WhisperStates(tiny_whisper, whisper.load_feature_extractor(whisper.EMBEDDED, 80), None, 4, **kw)


def test_each_utterance_takes_the_shortest_window_that_holds_it(tiny_whisper, speech):
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    short, long_ = speech[0][: 16000 * 3 // 2], speech[1]
    assert len(long_) > 2 * 16000
    mixed = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[2, 30])([short, long_])
    only2 = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[2])([short])[0]
    only30 = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[30])([long_])[0]
    for got, want in ((mixed[0], only2), (mixed[1], only30)):
        np.testing.assert_allclose(got[1], want[1], atol=1e-4)
        np.testing.assert_allclose(got[0], want[0], atol=1e-4)


def test_windows_plan():
    sizes = [10, 30]
    ws = whisper.windows([5, 10, 11, 65], sizes)
    assert [(w.item, w.start, w.num_samples, w.size) for w in ws] == [
        (0, 0, 5, 10), (1, 0, 10, 10), (2, 0, 11, 30), (3, 0, 30, 30), (3, 30, 30, 30), (3, 60, 5, 30)]


def test_the_last_block_runs_on_the_kept_frames_only_and_gives_the_encoders_states(tiny_whisper, speech):
    ext = whisper.load_feature_extractor(whisper.EMBEDDED, 80)
    st = whisper.WhisperStates(tiny_whisper, ext, None, 4, windows_s=[10])
    size = st.sizes[0]
    chunks = [speech[0][:size], speech[1][: size // 3]]
    feats = ext(chunks, sampling_rate=16000, return_tensors="pt", padding="max_length", max_length=size).input_features
    keep = tables.frames_for(len(chunks[0]))
    with torch.inference_mode():
        mid, last = whisper.encoder_states(st.encoder, feats, st.positions[size], 2, keep)
        with whisper.window_of(st.encoder, st.positions[size]) as enc:
            out = enc(feats, output_hidden_states=True)
    assert last.shape == (2, keep, 384) and keep < out.last_hidden_state.shape[1]
    np.testing.assert_allclose(mid.numpy(), out.hidden_states[2][:, :keep].numpy(), atol=1e-5)
    np.testing.assert_allclose(last.numpy(), out.last_hidden_state[:, :keep].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="mid layer 4 is not before the last"):
        whisper.encoder_states(st.encoder, feats, st.positions[size], 4, keep)
