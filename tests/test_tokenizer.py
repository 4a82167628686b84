"""taste_rvq and the tokenizer: codes per text token, the tokenize table, the API and the CLI, on the
tiny espeak split (a few epochs of a tiny model: this checks the plumbing, not the quality)."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from taste_pipeline import checkpoint, data, hardware, params, tables, tokenizer, train, whisper
from taste_pipeline.model import ModelConfig, TasteModel
from taste_pipeline.train_params import Train
from taste_pipeline.tokenizer import TasteTokenizer, TokenizerError

TINY = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=2, epochs=2, batch_size=4, warmup_steps=2,
            val_speakers=1, amp=False, rvq_levels=3, rvq_codebook_size=16, seed=3)


def _train_rvq(tiny_tables, out, **kw):
    split, meta = data.load_split(**tiny_tables)
    tr, va = data.speaker_split(split, 1, 0)
    p = Train(**(TINY | kw))
    model = train.build_model(int(meta["vocab_size"]), *split.widths, dataclasses.replace(p, squeeze="rvq"), whisper.EMBEDDED, split.text_model)
    train.fit(model, tr, va, p, out)
    return out


@pytest.fixture(scope="module")
def rvq_dir(tiny_tables, tmp_path_factory):
    return _train_rvq(tiny_tables, tmp_path_factory.mktemp("taste_rvq"))


@pytest.fixture(scope="module")
def rvq_durations_dir(tiny_tables, tmp_path_factory):
    """unit_alignment durations: each token's duration is its last code."""
    return _train_rvq(tiny_tables, tmp_path_factory.mktemp("taste_rvq_durations"), unit_alignment="durations")


@pytest.mark.parametrize("alignment", ["none", "durations"])
def test_codes_are_per_text_token_and_padding_is_marked(alignment):
    """With unit_alignment durations each token's last code is its duration, and decoding reads where
    each token lies off the codes too."""
    torch.manual_seed(0)
    m = TasteModel(ModelConfig(speech="tokens", squeeze="rvq", vocab_size=16, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                               agg_layers=1, agg_heads=2, agg_ffn=64, rvq_levels=3, rvq_codebook_size=8,
                               unit_alignment=alignment))
    g = torch.Generator().manual_seed(0)
    m.squeeze.init_codebooks(torch.randn(64, 384, generator=g))
    assert m.squeeze.ready
    batch = {"text_emb": torch.randn(2, 5, 384, generator=g), "text_len": torch.tensor([5, 2]),
             "mid": torch.randn(2, 30, 384, generator=g), "last": torch.randn(2, 30, 384, generator=g),
             "frame_len": torch.tensor([30, 12]), "units": torch.randint(0, 16, (2, 9), generator=g),
             "unit_len": torch.tensor([9, 4]), "speaker": torch.randn(2, 256, generator=g)}
    m.eval()
    codes = m.encode(batch)
    extra = int(alignment == "durations")
    assert codes.shape == (2, 5, 3 + extra)
    assert (codes[0] >= 0).all() and (codes[1, :2] >= 0).all() and (codes[1, 2:] == -1).all()
    assert m.bits_per_token == 3 * 3 + 8 * extra
    if extra:
        assert codes[:, :, -1].clamp(min=0).sum(1).tolist() == [30, 12]  # every frame in some token's span
    # Decoding from the codes alone is decoding from the speech: same logits, no Whisper states needed.
    from_codes = dict(batch, codes=codes, mid=None, last=None, frame_len=None)
    torch.testing.assert_close(m(from_codes)[0], m(batch)[0])
    m.train()
    _, losses = m(batch)
    assert set(losses) == {"ce", "commit", "loss"} and torch.isclose(losses["loss"], losses["ce"] + losses["commit"])
    if extra:  # another token's duration changes what is decoded
        moved = codes.clone()
        moved[0, 0, -1], moved[0, 1, -1] = codes[0, 1, -1], codes[0, 0, -1]
        assert not torch.allclose(m(dict(from_codes, codes=moved))[0][0], m(from_codes)[0][0])
    with pytest.raises(ValueError, match="no quantizer"):
        TasteModel(ModelConfig(speech="tokens", vocab_size=16, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                               agg_layers=1, agg_heads=2, agg_ffn=64)).encode(batch)


def test_codebooks_start_from_k_means_over_many_tokens(tiny_tables):
    split, meta = data.load_split(**tiny_tables)
    p = Train(**{**TINY, "rvq_codebook_size": 4})
    model = train.build_model(int(meta["vocab_size"]), *split.widths, dataclasses.replace(p, squeeze="rvq"), whisper.EMBEDDED)
    assert not model.squeeze.ready
    n = train.init_codebooks(model, data.as_subset(split), p)
    assert n == 8 * 4 and model.squeeze.ready
    first = model.squeeze.quantizer.layers[0]._codebook.embed[0]
    assert len(torch.unique(first, dim=0)) == 4  # distinct centroids, not duplicated samples


def test_the_checkpoint_names_its_features_and_training_used_the_quantizer(rvq_dir):
    info = json.loads((rvq_dir / checkpoint.CONFIG_FILE).read_text())
    assert info["features"]["whisper.model"] == whisper.EMBEDDED
    assert info["features"]["text.case"] == "lower" and "whisper.mid_layer" in info["features"]
    assert (info["model_args"]["speech"], info["model_args"]["squeeze"]) == ("tokens", "rvq")


@pytest.fixture(scope="module")
def float32_whisper(tiny_tables, tmp_path_factory):
    """The tiny split's whisper table computed in float32 whatever the CPU. In bfloat16 (auto on a CPU
    with AMX) the last layer's states depend on which windows share the batch (up to 0.125 apart after
    the table's float16 rounding, measured), so the stage's batches of 4 and the API's one window
    agree exactly only in float32."""
    out = tmp_path_factory.mktemp("whisper32") / "w.parquet"
    whisper.extract_split(tiny_tables["manifest_path"], out, params.Whisper(batch_size=4, rows_per_group=8,
                                                                            dtype="float32"))
    return out


@pytest.mark.parametrize("model", ["rvq_dir", "rvq_durations_dir"])
def test_tokenize_split_writes_the_codes_the_api_gives(model, tiny_tables, float32_whisper, tmp_path, request):
    rvq_dir = request.getfixturevalue(model)
    bits = 3 * 4 + (8 if model == "rvq_durations_dir" else 0)
    out = tmp_path / "codes.parquet"
    n = tokenizer.tokenize_split(rvq_dir, tiny_tables["manifest_path"], float32_whisper,
                                 tiny_tables["text_path"], out, batch_size=3, rows_per_group=5)
    table = tables.read_codes(out)
    manifest = tables.read_manifest(tiny_tables["manifest_path"])
    assert n == table.num_rows == manifest.num_rows
    assert table.column("utt_id").to_pylist() == manifest.column("utt_id").to_pylist()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert float(meta["bits_per_token"]) == bits
    tokens = sum(len(t) for t in table.column("token_ids").to_pylist())
    assert float(meta["bitrate_bps"]) == pytest.approx(tokens * bits / float(np.sum(manifest.column("duration"))))
    # The API from the audio file gives the stage's codes (the same features, rounded as the table stores
    # them), with Whisper in the table's precision whatever this CPU's auto is.
    tok = TasteTokenizer.load(rvq_dir, whisper_dtype="float32")
    row = manifest.to_pylist()[0]
    codes = tok.encode(tiny_tables["manifest_path"].parent / row["audio_path"], row["text"])
    np.testing.assert_array_equal(codes, tables.row_matrix(table, "codes", 0))
    # Batched (padded) and written in row groups: the same as one at a time.
    again = tmp_path / "again.parquet"
    tokenizer.tokenize_split(rvq_dir, tiny_tables["manifest_path"], float32_whisper,
                             tiny_tables["text_path"], again, batch_size=1, rows_per_group=64)
    assert tables.read_codes(again).column("codes").to_pylist() == table.column("codes").to_pylist()
    # Decoding needs the codes, the transcript and the voice only: with durations, where each token lies too.
    voice = tables.read_speaker(tiny_tables["speaker_path"]).column("emb")[0].as_py()
    units = tok.decode(codes, row["text"], max_units=30, speaker=voice)
    assert 0 < len(units) <= 30
    if model == "rvq_durations_dir":
        assert meta["duration_bits"] == "8" and codes.shape[1] == 4
        whisper = tables.read_whisper(tiny_tables["whisper_path"])
        assert whisper.column("utt_id")[0].as_py() == row["utt_id"]
        assert codes[:, -1].sum() == whisper.column("num_frames")[0].as_py()  # each frame in a token's span
        wrong = codes.copy()
        wrong[0, -1] = 256
        with pytest.raises(TokenizerError, match="duration"):
            tok.decode(wrong, row["text"], speaker=voice)


def test_codes_table_is_checked():
    schema = tables.codes_schema(2)
    meta = {"tokenizer.model": "m", "rvq_levels": "2", "rvq_codebook_size": "4", "bits_per_token": "4",
            "text_tokens_per_s": "3", "bitrate_bps": "12"}
    good = pa.Table.from_pydict({"utt_id": ["a"], "token_ids": [[1, 2]],
                                 "codes": tables.code_column([np.array([[0, 3], [1, 2]])], 2)}, schema=schema)
    tables.validate_codes(good.replace_schema_metadata(meta))
    with pytest.raises(tables.SchemaError, match="metadata lacks"):
        tables.validate_codes(good)
    bad = pa.Table.from_pydict({"utt_id": ["a"], "token_ids": [[1, 2]],
                                "codes": tables.code_column([np.array([[0, 4], [1, 2]])], 2)}, schema=schema)
    with pytest.raises(tables.SchemaError, match=r"outside \[0, 4\)"):
        tables.validate_codes(bad.replace_schema_metadata(meta))
    timed = pa.Table.from_pydict({"utt_id": ["a"], "token_ids": [[1, 2]],
                                  "codes": tables.code_column([np.array([[0, 3, 9], [1, 2, 255]])], 3)},
                                 schema=tables.codes_schema(3))
    tables.validate_codes(timed.replace_schema_metadata(meta | {"duration_bits": "8"}))
    with pytest.raises(tables.SchemaError, match="duration code of 8 bits"):
        tables.validate_codes(timed.replace_schema_metadata(meta | {"rvq_levels": "3", "duration_bits": "8"}))
    with pytest.raises(tables.SchemaError, match=r"durations outside \[0, 16\)"):
        tables.validate_codes(timed.replace_schema_metadata(meta | {"duration_bits": "4"}))
    short = pa.Table.from_pydict({"utt_id": ["a"], "token_ids": [[1, 2, 3]],
                                  "codes": tables.code_column([np.array([[0, 1], [1, 2]])], 2)}, schema=schema)
    with pytest.raises(tables.SchemaError, match="3 token ids but 2 rows"):
        tables.validate_codes(short.replace_schema_metadata(meta))


def test_decode_rebuilds_units_from_codes_and_stops_at_the_model_limit(rvq_dir, tiny_tables):
    tok = TasteTokenizer.load(rvq_dir)
    row = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[1]
    codes = tok.encode(tiny_tables["manifest_path"].parent / row["audio_path"], row["text"])
    with pytest.raises(TokenizerError, match="decodes in a voice"):
        tok.decode(codes, row["text"])
    # The voice from a recording is the speaker stage's embedding of it.
    wav = tiny_tables["manifest_path"].parent / row["audio_path"]
    table = tables.read_speaker(tiny_tables["speaker_path"])
    assert table.column("utt_id")[1].as_py() == row["utt_id"]
    np.testing.assert_allclose(tok.speaker_embedding(wav), table.column("emb")[1].as_py(), atol=1e-5)
    units = tok.decode(codes, row["text"], max_units=40, speaker=wav)
    assert 0 < len(units) <= 40 and all(0 <= u < tok.model.cfg.vocab_size for u in units)
    assert tok.decode(codes, row["text"], max_units=40, speaker=wav) == units  # seeded sampling: repeatable
    # From the codes alone the decoder does what it does with the speech the codes were made from.
    greedy = tok.decode(codes, row["text"], max_units=40, top_k=None, speaker=table.column("emb")[1].as_py())
    split = data.Split(tiny_tables["manifest_path"], tiny_tables["whisper_path"], tiny_tables["text_path"],
                       speaker_path=tiny_tables["speaker_path"])
    with_speech = data.collate([split.examples([1])[1]])
    assert greedy == tok.model.generate(with_speech, max_units=40)[0].tolist()


def test_clear_errors(rvq_dir, tiny_tables, tmp_path):
    tok = TasteTokenizer.load(rvq_dir)
    wav = tiny_tables["manifest_path"].parent / tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[0]["audio_path"]
    with pytest.raises(TokenizerError, match="empty transcript"):
        tok.encode(wav, "   ")
    with pytest.raises(TokenizerError, match="takes at most"):
        tok.encode(wav, "word " * 500)
    with pytest.raises(TokenizerError, match=r"\(3, 3\) is needed"):
        tok.decode(np.zeros((2, 3), dtype=int), "one two three")
    with pytest.raises(TokenizerError, match=r"integers in \[0, 16\)"):
        tok.decode(np.full((len(tok.text_tokens("hello")), 3), 16), "hello")
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.flac: empty file"):
        tok.encode(empty, "hello")
    # A checkpoint without a quantizer.
    taste = train.build_model(8, 384, 384, Train(**{**TINY, "agg_init": "fresh"}), None)
    checkpoint.save_checkpoint(taste, tmp_path / "taste", {})
    with pytest.raises(TokenizerError, match="has no quantizer"):
        TasteTokenizer.load(tmp_path / "taste")
    with pytest.raises(TokenizerError, match="no model.safetensors"):
        TasteTokenizer.load(tmp_path / "nowhere")


def test_any_rate_and_channel_count_goes_through_the_pipelines_resampling(rvq_dir, tiny_tables, tmp_path):
    tok = TasteTokenizer.load(rvq_dir)
    row = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[0]
    x, rate = sf.read(tiny_tables["manifest_path"].parent / row["audio_path"], dtype="float32")
    stereo44 = tmp_path / "stereo.wav"
    import torchaudio

    up = torchaudio.functional.resample(torch.from_numpy(x), rate, 44100).numpy()
    sf.write(stereo44, np.stack([up, up], axis=1), 44100, subtype="FLOAT")
    got = tok.load_audio(stereo44)
    assert abs(len(got) - len(x)) <= 1
    codes = tok.encode(stereo44, row["text"])
    assert codes.shape == (len(tok.text_tokens(row["text"])), 3)
    assert tok.encode((np.stack([up, up], axis=1), 44100), row["text"]).tolist() == codes.tolist()


def test_whisper_precision_is_the_callers_choice(rvq_dir, tiny_tables, monkeypatch, capsys):
    """``auto`` follows this machine as the whisper stage does; an explicit precision overrides it, from
    the API and the CLI; a precision that does not exist is refused with an error naming it."""
    monkeypatch.setattr(hardware, "auto_dtype", lambda device: "bfloat16")  # as on a CPU with AMX
    assert TasteTokenizer.load(rvq_dir).states().dtype_name == "bfloat16"
    assert TasteTokenizer.load(rvq_dir, whisper_dtype="float32").states().dtype_name == "float32"
    with pytest.raises(tokenizer.TokenizerError, match="float8"):
        TasteTokenizer.load(rvq_dir, whisper_dtype="float8")
    row = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[0]
    wav = str(tiny_tables["manifest_path"].parent / row["audio_path"])
    built = []
    real = whisper.WhisperStates.__init__
    monkeypatch.setattr(whisper.WhisperStates, "__init__",
                        lambda self, *a, **k: (real(self, *a, **k), built.append(self.dtype_name))[0])
    assert tokenizer.main(["encode", "--model", str(rvq_dir), "--whisper-dtype", "float32", wav, row["text"]]) == 0
    assert built == ["float32"]
    capsys.readouterr()


def test_cli_round_trip(rvq_dir, tiny_tables, tmp_path, capsys):
    row = tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()[2]
    wav = str(tiny_tables["manifest_path"].parent / row["audio_path"])
    assert tokenizer.main(["encode", "--model", str(rvq_dir), wav, row["text"]]) == 0
    enc = json.loads(capsys.readouterr().out)
    assert np.asarray(enc["codes"]).shape == (len(enc["text_tokens"]), 3) and enc["bits_per_token"] == 12
    assert len(enc["speaker"]) == 256  # the voice of the encoded speech, which decode then uses
    (tmp_path / "codes.json").write_text(json.dumps(enc))
    for codes, voice in ((str(tmp_path / "codes.json"), []), (json.dumps(enc["codes"]), ["--speaker", wav])):
        assert tokenizer.main(["decode", "--model", str(rvq_dir), "--codes", codes, "--max-units", "30", *voice,
                               row["text"]]) == 0
        dec = json.loads(capsys.readouterr().out)
        assert 0 < dec["num_units"] == len(dec["units"]) <= 30
    assert tokenizer.main(["decode", "--model", str(rvq_dir), "--codes", json.dumps(enc["codes"]), row["text"]]) == 2
    assert "decodes in a voice" in capsys.readouterr().err
    assert tokenizer.main(["decode", "--model", str(rvq_dir), "--codes", "[[1, 2]]", row["text"]]) == 2
    assert "is needed" in capsys.readouterr().err
