"""Whisper families without the Hub: small random-weight checkpoints of each family's shape, with the
tokenizer rebuilt from openai-whisper's own tiktoken files, give the prefixes openai-whisper gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from taste_pipeline import text, train, train_params, whisper

# (name, multilingual, languages, vocab, mel bins): English-only (tiny.en ... medium.en), multilingual
# v1/v2 (tiny ... large-v2), large-v3 / turbo.
FAMILIES = [("english-only", False, 99, 51864, 80), ("multilingual-v2", True, 99, 51865, 80),
            ("large-v3", True, 100, 51866, 128)]


def openai_prefix(multilingual: bool, languages: int) -> list[int]:
    from whisper.tokenizer import get_tokenizer  # openai-whisper, the reference

    tok = get_tokenizer(multilingual, num_languages=languages, language="en" if multilingual else None,
                        task="transcribe" if multilingual else None)
    return list(tok.sot_sequence_including_notimestamps)


def family_checkpoint(folder: Path, multilingual: bool, languages: int, vocab: int, mels: int, d: int = 64) -> Path:
    """A transformers Whisper folder of the family's vocabulary and mel bins, random weights, and a
    fast tokenizer converted from openai-whisper's tiktoken encoding (special tokens included)."""
    import whisper as openai_whisper
    from transformers import PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from whisper.tokenizer import get_encoding

    name = "multilingual" if multilingual else "gpt2"
    enc = get_encoding(name, num_languages=languages)
    assert enc.n_vocab == vocab
    ranks = Path(openai_whisper.__file__).parent / "assets" / f"{name}.tiktoken"  # the file openai-whisper reads
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=enc._pat_str,
                                  extra_special_tokens=enc._special_tokens).converted()
    PreTrainedTokenizerFast(tokenizer_object=converted).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=mels, d_model=d, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d,
                        decoder_ffn_dim=2 * d, decoder_start_token_id=50258 if multilingual else 50257)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request, tmp_path_factory):
    name, multilingual, languages, vocab, mels = request.param
    folder = family_checkpoint(tmp_path_factory.mktemp(name), multilingual, languages, vocab, mels)
    return folder, multilingual, languages, vocab


def test_prefix_tokens_are_openai_whispers(family):
    folder, multilingual, languages, vocab = family
    got = whisper.prefix_tokens(whisper.load_tokenizer(str(folder)), vocab, "en")
    assert got == openai_prefix(multilingual, languages)
    assert len(got) == (4 if multilingual else 2)


def test_the_embedded_tiny_en_prefix_is_openai_whispers_english_one():
    tok = whisper.load_tokenizer(whisper.EMBEDDED)
    assert whisper.prefix_tokens(tok, 51864) == openai_prefix(False, 99)


def test_the_aggregator_starts_behind_the_familys_prefix(family):
    folder, multilingual, languages, vocab = family
    p = train_params.Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=2)
    model = train.build_model(16, 64, 64, p, str(folder), str(folder))
    table = whisper.load_model(str(folder)).model.decoder.embed_tokens.weight
    expected = openai_prefix(multilingual, languages)
    assert model.cfg.agg_prefix == len(expected)
    torch.testing.assert_close(model.speech.aggregator.prefix.detach(), table[expected].detach())
    # The model runs with it, and the outputs drop the prefix.
    out = model.speech.aggregator(torch.randn(1, 5, 64), torch.randn(1, 30, 64), torch.randn(1, 30, 64),
                           torch.ones(1, 30, dtype=torch.bool))
    assert out.shape == (1, 5, 64)


def test_another_language_is_looked_up_and_an_unknown_one_is_named(family):
    folder, multilingual, languages, vocab = family
    tok = whisper.load_tokenizer(str(folder))
    if not multilingual:
        assert whisper.prefix_tokens(tok, vocab, "de") == openai_prefix(False, languages)  # no language token
        return
    from whisper.tokenizer import get_tokenizer

    ref = get_tokenizer(True, num_languages=languages, language="de", task="transcribe")
    assert whisper.prefix_tokens(tok, vocab, "de") == list(ref.sot_sequence_including_notimestamps)
    with pytest.raises(ValueError, match="train.agg_language"):
        whisper.prefix_tokens(tok, vocab, "klingon")


def test_a_text_model_other_than_the_whisper_model_fails_naming_both(family, tmp_path):
    folder = family[0]
    p = train_params.Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=2)
    with pytest.raises(ValueError, match="whisper.model.*text.model"):
        train.build_model(16, 384, 64, p, str(folder), whisper.EMBEDDED)
    fresh = train_params.Train(d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1, agg_init="fresh")
    train.build_model(16, 384, 64, fresh, str(folder), whisper.EMBEDDED)  # any text model with fresh
    train.build_model(16, 384, 64, dataclasses.replace(p, speech="none"), str(folder), whisper.EMBEDDED)  # no aggregator at all


@pytest.mark.parametrize("shards", [False, True])
def test_the_embedding_table_is_read_alone(family, tmp_path, monkeypatch, shards):
    """text.load reads the one tensor from safetensors (one file or shards) instead of the model."""
    from transformers import AutoModel, WhisperForConditionalGeneration

    folder = family[0]
    expected = AutoModel.from_pretrained(str(folder)).get_input_embeddings().weight.detach().numpy()
    if shards:  # a sharded checkpoint, as large models come
        m = WhisperForConditionalGeneration.from_pretrained(str(folder))
        folder = tmp_path / "sharded"
        m.save_pretrained(folder, max_shard_size="2MB")
        assert (folder / "model.safetensors.index.json").exists()
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded the whole model"))
    np.testing.assert_array_equal(text.embedding_table(str(folder)), expected)
