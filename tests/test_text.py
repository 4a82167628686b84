import numpy as np
import pytest

from taste_pipeline import tables, text, whisper


@pytest.fixture(scope="module")
def tok_table():
    return text.load(whisper.EMBEDDED)


def test_token_ids_decode_back_to_the_transcript(tiny_tables, tok_table):
    table = tables.read_text(tiny_tables["text_path"])
    manifest = {r["utt_id"]: r["text"] for r in tables.read_manifest(tiny_tables["manifest_path"]).to_pylist()}
    tokenizer, emb_table = tok_table
    special = set(tokenizer.all_special_ids)
    for i, row in enumerate(table.select(["utt_id", "token_ids"]).to_pylist()):
        assert text.decode(tokenizer, row["token_ids"]) == manifest[row["utt_id"]].lower()
        assert not special & set(row["token_ids"])
        emb = tables.row_matrix(table, "emb", i)
        np.testing.assert_array_equal(emb, emb_table[row["token_ids"]].astype(np.float16))


@pytest.mark.parametrize("s", ["DON'T STOP", "CAFÉ NAÏVE ÆSIR", "A", "WELL  SPACED"])
def test_round_trip_for_odd_text(tok_table, s):
    tokenizer, _ = tok_table
    ids = text.tokenize(tokenizer, [s], "lower")[0]
    assert text.decode(tokenizer, ids) == s.lower().strip()


def test_lower_case_gives_fewer_tokens_than_upper(tok_table):
    tokenizer, _ = tok_table
    s = "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS"
    lower, keep = (text.tokenize(tokenizer, [s], c)[0] for c in ("lower", "keep"))
    assert len(lower) < len(keep)
    assert text.decode(tokenizer, keep) == s


def test_embedding_table_is_the_whisper_decoder_one(tok_table, tiny_whisper):
    _, table = tok_table
    np.testing.assert_array_equal(table, tiny_whisper.get_input_embeddings().weight.detach().numpy())
