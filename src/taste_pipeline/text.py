"""Text tokens and their embeddings: the aggregator's queries, one per text token.

Default: Whisper tiny.en's tokenizer and its decoder's token-embedding table (same width as the
encoder, and the table a pretrained Whisper-decoder aggregator was trained with). Real config: any
transformers tokenizer plus that model's input-embedding table (TASTE fed its Whisper tokens; an LLM's
table works the same way).

LibriSpeech transcripts are upper case. Whisper's BPE learned mostly mixed/lower-case text, so upper
case splits into ~60% more, rarer tokens (16 vs 10 for "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS").
``text.case: lower`` (the default) lower-cases before tokenizing, and a leading space is added because
Whisper's transcripts begin with one after the task prefix; token ids then decode back to the
(lower-cased) transcript exactly. No special tokens are stored.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from . import whisper

CASES = ("lower", "keep")


def load(name: str):
    """(tokenizer, embedding table as float32 numpy) for the ``text.model`` param."""
    if name == whisper.EMBEDDED:
        from transformers import WhisperTokenizerFast

        tokenizer = WhisperTokenizerFast(tokenizer_file=str(whisper.embedded_model_dir() / "tokenizer.json"))
        model = whisper.load_model(name)
    else:
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name, dtype=torch.float32)
        except OSError as e:
            raise ValueError(f"text.model: cannot load {name!r} ({e}); use {whisper.EMBEDDED!r} offline") from e
    table = model.get_input_embeddings().weight.detach().float().numpy()
    return tokenizer, table


def normalize(text: str, case: str) -> str:
    if case not in CASES:
        raise ValueError(f"text.case: {case!r} is not one of {CASES}")
    return " " + (text.lower() if case == "lower" else text)


def tokenize(tokenizer, texts: list[str], case: str) -> list[list[int]]:
    return [tokenizer.encode(normalize(t, case), add_special_tokens=False) for t in texts]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids).strip()


def embed(table: np.ndarray, ids: list[int]) -> np.ndarray:
    return table[np.asarray(ids, dtype=np.int64)]


def extract_split(manifest_path, out_path, model_name: str, case: str, rows_per_group: int = 64) -> int:
    """Write the text table of one split, ``rows_per_group`` utterances per Parquet row group (training
    reads it a row group at a time); returns the number of rows."""
    from tqdm import tqdm

    from . import tables

    manifest = tables.read_manifest(manifest_path)
    tokenizer, table = load(model_name)
    ids = [tokenize(tokenizer, [t], case)[0] for t in tqdm(manifest.column("text").to_pylist(), desc="text", unit="utt")]
    utt_ids = manifest.column("utt_id").to_pylist()
    for u, t, i in zip(utt_ids, manifest.column("text").to_pylist(), ids):
        if not i:
            raise ValueError(f"utterance {u}: text {t!r} gives no tokens")
    width = table.shape[1]
    tables.write_table(out_path, tables.validate_text(pa.Table.from_pydict(
        {"utt_id": utt_ids, "token_ids": ids, "emb": tables.matrix_column([embed(table, i) for i in ids], width)},
        schema=tables.text_schema(width))), tables.text_schema(width),
        metadata={"text.model": model_name, "text.case": case, "special_tokens": "none"}, rows_per_group=rows_per_group)
    return len(ids)
