"""Joining and batching: the four tables of a split become one Example per utterance, and batches are
length-sorted (padding is cost) and padded, with per-item lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from . import tables


@dataclass
class Example:
    utt_id: str
    speaker_id: str
    text: str
    token_ids: np.ndarray
    text_emb: torch.Tensor  # (L, dq) float16
    mid: torch.Tensor  # (F, da) float16
    last: torch.Tensor  # (F, da) float16
    units: torch.Tensor  # (T,) int64


def load_split(manifest_path, whisper_path, text_path, s3_path) -> tuple[list[Example], dict]:
    """Join the four tables of a split on utt_id; an utterance missing from any of them is an error."""
    manifest = tables.read_manifest(manifest_path)
    w, t, s = tables.read_whisper(whisper_path), tables.read_text(text_path), tables.read_s3(s3_path)
    ids = manifest.column("utt_id").to_pylist()
    index = {}
    for name, table in (("whisper", w), ("text", t), ("s3", s)):
        pos = {u: i for i, u in enumerate(table.column("utt_id").to_pylist())}
        missing = [u for u in ids if u not in pos]
        if missing:
            raise ValueError(f"{name} table lacks utterance {missing[0]} (and {len(missing) - 1} more) of {manifest_path}")
        index[name] = pos
    rows = manifest.select(["utt_id", "speaker_id", "text"]).to_pylist()
    token_ids = t.column("token_ids").to_pylist()
    tokens = s.column("tokens").to_pylist()
    out = []
    for r in rows:
        u = r["utt_id"]
        out.append(Example(
            utt_id=u, speaker_id=r["speaker_id"], text=r["text"],
            token_ids=np.asarray(token_ids[index["text"][u]]),
            text_emb=torch.from_numpy(tables.row_matrix(t, "emb", index["text"][u]).copy()),
            mid=torch.from_numpy(tables.row_matrix(w, "mid", index["whisper"][u]).copy()),
            last=torch.from_numpy(tables.row_matrix(w, "last", index["whisper"][u]).copy()),
            units=torch.tensor(tokens[index["s3"][u]], dtype=torch.long)))
    meta = {k.decode(): v.decode() for k, v in (s.schema.metadata or {}).items()}
    return out, meta


def speaker_split(examples: list[Example], val_speakers: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_speakers`` whole speakers (chosen with the seed) for validation."""
    speakers = sorted({e.speaker_id for e in examples})
    if not 1 <= val_speakers < len(speakers):
        raise ValueError(f"train.val_speakers: {val_speakers} of {len(speakers)} train speakers leaves nothing to train or validate on")
    held = set(random.Random(seed).sample(speakers, val_speakers))
    return [e for e in examples if e.speaker_id not in held], [e for e in examples if e.speaker_id in held]


def collate(examples: list[Example], speech_from: list[Example] | None = None) -> dict:
    """Pad a batch. ``speech_from``: take each item's Whisper states from another utterance (control)."""
    speech = speech_from or examples
    B = len(examples)
    L = max(len(e.text_emb) for e in examples)
    Fr = max(len(e.mid) for e in speech)
    T = max(len(e.units) for e in examples)
    dq, da = examples[0].text_emb.shape[1], speech[0].mid.shape[1]
    batch = {"text_emb": torch.zeros(B, L, dq), "mid": torch.zeros(B, Fr, da), "last": torch.zeros(B, Fr, da),
             "units": torch.zeros(B, T, dtype=torch.long)}
    for i, (e, s) in enumerate(zip(examples, speech)):
        batch["text_emb"][i, : len(e.text_emb)] = e.text_emb.float()
        batch["mid"][i, : len(s.mid)] = s.mid.float()
        batch["last"][i, : len(s.last)] = s.last.float()
        batch["units"][i, : len(e.units)] = e.units
    batch["text_len"] = torch.tensor([len(e.text_emb) for e in examples])
    batch["frame_len"] = torch.tensor([len(s.mid) for s in speech])
    batch["unit_len"] = torch.tensor([len(e.units) for e in examples])
    return batch


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batches(examples: list[Example], batch_size: int, rng: random.Random | None = None):
    """Batches of similar length (less padding); shuffled batch order when ``rng`` is given."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].units), examples[i].utt_id))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    return groups
