"""Joining and batching: the four tables of a split become one Example per utterance, and batches are
length-sorted (padding is cost) and padded, with per-item lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
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
    speaker: torch.Tensor | None = None  # (D,) float32: the speaker embedding (the speaker stage), if read
    durations: np.ndarray | None = None  # (L,) each text token's true duration in frames (word timings), if read


class Split:
    """The tables of one split (manifest, whisper, text, s3 targets and speaker embeddings) joined on
    utt_id, read lazily.

    In memory per utterance: ids, speaker, text, token ids, target units, lengths (small integer
    columns) and the speaker embedding (a few hundred floats). The big columns (text embeddings, Whisper mid/last states) stay in their Parquet files and
    are read a row group at a time when a batch needs them, so memory is bounded by what ``Loader``
    holds, not by the split (LibriSpeech train-clean-100 with whisper-large-v3: ~93 GB of states).
    Every row group is validated as it is read.
    """

    def __init__(self, manifest_path, whisper_path, text_path, s3_path=None, speaker_path=None, words_path=None):
        """Without ``s3_path`` (tokenizing) every utterance has no target units; without ``speaker_path``
        no speaker embedding, without ``words_path`` (true word timings) no true durations (a model that
        reads one refuses such a batch)."""
        manifest = tables.read_manifest(manifest_path)
        s = tables.read_s3(s3_path) if s3_path is not None else None
        self.meta = {k.decode(): v.decode() for k, v in (s.schema.metadata or {}).items()} if s is not None else {}
        self.utt_ids = manifest.column("utt_id").to_pylist()
        self.speaker_ids = manifest.column("speaker_id").to_pylist()
        self.texts = manifest.column("text").to_pylist()
        self.paths = {"whisper": str(whisper_path), "text": str(text_path)}
        self.speaker_meta: dict[str, str] = {}
        self.reopen()
        self.validators = {"whisper": tables.validate_whisper, "text": tables.validate_text}
        t = self.files["text"].read(columns=["utt_id", "token_ids"])
        t_pos = self._positions("text", t.column("utt_id").to_pylist(), manifest_path)
        w_pos = self._positions("whisper", self.files["whisper"].read(columns=["utt_id"]).column("utt_id").to_pylist(),
                                manifest_path)
        # Where each utterance sits in the big tables: (row group, row within it).
        self.where = {name: self._row_groups(self.files[name], pos) for name, pos in (("whisper", w_pos), ("text", t_pos))}
        if s is not None:
            self._units = self._slices(s.column("tokens"), self._positions("s3", s.column("utt_id").to_pylist(), manifest_path))
        else:
            self._units = [np.zeros(0, np.int32)] * len(self.utt_ids)
        self._token_ids = self._slices(t.column("token_ids"), t_pos)
        self.speaker_width, self._speakers = 0, None
        if speaker_path is not None:
            sp = tables.read_speaker(speaker_path)
            emb = sp.column("emb").combine_chunks()
            self.speaker_width = emb.type.list_size
            self.speaker_meta = {k.decode(): v.decode() for k, v in (sp.schema.metadata or {}).items()}
            mat = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.speaker_width)
            self._speakers = mat[self._positions("speaker", sp.column("utt_id").to_pylist(), manifest_path)]
        self._durations = None if words_path is None else self._true_durations(words_path, manifest_path, manifest)

    def _true_durations(self, words_path, manifest_path, manifest) -> list[np.ndarray]:
        """Each utterance's true token durations (``alignment.token_durations``) from the word timings."""
        from . import alignment, whisper

        t = tables.read_words(words_path)
        starts = t.column("start").to_pylist()
        pos = self._positions("words", t.column("utt_id").to_pylist(), manifest_path)
        tokenizer = whisper.load_tokenizer(self.text_model)
        frames = [tables.frames_for(n) for n in manifest.column("num_samples").to_pylist()]
        out = []
        for i, p in enumerate(pos):
            pieces = [tokenizer.decode([int(k)]) for k in self._token_ids[i]]
            try:
                out.append(alignment.token_durations(pieces, np.asarray(starts[p]), frames[i]))
            except ValueError as e:
                raise ValueError(f"{words_path}: utterance {self.utt_ids[i]}: {e}") from None
        return out

    def reopen(self) -> None:
        """Open the big tables' files (again): a DataLoader worker reads through handles of its own."""
        self.files = {name: pq.ParquetFile(path) for name, path in self.paths.items()}

    def __getstate__(self) -> dict:  # file handles do not pickle (spawned workers): reopen on arrival
        return {k: v for k, v in self.__dict__.items() if k != "files"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reopen()

    def _positions(self, name: str, table_ids: list[str], manifest_path) -> list[int]:
        """Row of each manifest utterance in a table; an utterance it lacks is an error."""
        pos = {u: i for i, u in enumerate(table_ids)}
        missing = [u for u in self.utt_ids if u not in pos]
        if missing:
            raise ValueError(f"{name} table lacks utterance {missing[0]} (and {len(missing) - 1} more) of {manifest_path}")
        return [pos[u] for u in self.utt_ids]

    @staticmethod
    def _row_groups(f: pq.ParquetFile, rows: list[int]) -> list[tuple[int, int]]:
        starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        return [(int(g), int(r - starts[g])) for g, r in zip(groups, rows)]

    @staticmethod
    def _slices(column, rows: list[int]) -> list[np.ndarray]:
        """Per row, its list column's values as a view of one flat array (no Python ints per value)."""
        arr = column.combine_chunks()
        offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy()
        return [values[offsets[r] : offsets[r + 1]] for r in rows]

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def text_model(self) -> str | None:
        """The ``text.model`` the text table was made with (its metadata)."""
        meta = self.files["text"].schema_arrow.metadata or {}
        return meta[b"text.model"].decode() if b"text.model" in meta else None

    @property
    def feature_meta(self) -> dict[str, str]:
        """What made the features (the whisper, text and speaker tables' metadata: models, layers, case,
        speaker encoder), which a checkpoint keeps so the tokenizer can make the same features from new audio."""
        out = {}
        for name in ("whisper", "text"):
            meta = self.files[name].schema_arrow.metadata or {}
            out.update({k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith(f"{name}.")})
        return {**out, **self.speaker_meta}

    @property
    def widths(self) -> tuple[int, int]:
        """(text embedding width, Whisper width)."""
        width = lambda name, col: self.files[name].schema_arrow.field(col).type.value_type.list_size  # noqa: E731
        return width("text", "emb"), width("whisper", "mid")

    def speaker(self, i: int) -> np.ndarray:
        """Utterance i's speaker embedding (the speaker table's row); an error if the split was read without one."""
        if self._speakers is None:
            raise ValueError("this split was read without its speaker table (the speaker stage's)")
        return self._speakers[i]

    def num_units(self, i: int) -> int:
        return len(self._units[i])

    def num_text_tokens(self, i: int) -> int:
        return len(self._token_ids[i])

    def units(self, i: int) -> np.ndarray:
        return self._units[i]

    def token_ids(self, i: int) -> np.ndarray:
        return self._token_ids[i]

    def row_group(self, i: int) -> int:
        return self.where["whisper"][i][0]

    def examples(self, indices) -> dict[int, Example]:
        """The Examples of ``indices``, each row group read once."""
        want = sorted(set(indices))
        # (table, row group) -> column -> that row group's matrices
        rows: dict[tuple[str, int], dict[str, list[np.ndarray]]] = {}
        for name, f in self.files.items():
            cols = ["mid", "last"] if name == "whisper" else ["emb"]
            for g in sorted({self.where[name][i][0] for i in want}):
                read = f.read_row_group(g, columns=["utt_id", "num_frames", *cols] if name == "whisper"
                                        else ["utt_id", "token_ids", *cols])
                read = self.validators[name](read, f"{self.paths[name]} row group {g}")
                rows[name, g] = {c: tables.matrix_rows(read, c) for c in cols}
        out = {}
        for i in want:
            (wg, wr), (tg, tr) = self.where["whisper"][i], self.where["text"][i]
            w, t = rows["whisper", wg], rows["text", tg]
            out[i] = Example(
                utt_id=self.utt_ids[i], speaker_id=self.speaker_ids[i], text=self.texts[i],
                token_ids=self._token_ids[i],
                text_emb=torch.from_numpy(t["emb"][tr].copy()),
                mid=torch.from_numpy(w["mid"][wr].copy()),
                last=torch.from_numpy(w["last"][wr].copy()),
                units=torch.from_numpy(self._units[i].astype(np.int64)),
                speaker=None if self._speakers is None else torch.from_numpy(self._speakers[i].copy()),
                durations=None if self._durations is None else self._durations[i])
        return out


class InMemory:
    """A list of Examples behind the same interface as ``Split`` (tests, benches, one utterance)."""

    def __init__(self, examples: list[Example], meta: dict | None = None):
        self.items, self.meta = examples, meta or {}
        self.utt_ids = [e.utt_id for e in examples]
        self.speaker_ids = [e.speaker_id for e in examples]
        self.speaker_width = len(examples[0].speaker) if examples and examples[0].speaker is not None else 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def widths(self) -> tuple[int, int]:
        return self.items[0].text_emb.shape[1], self.items[0].mid.shape[1]

    def num_units(self, i: int) -> int:
        return len(self.items[i].units)

    def num_text_tokens(self, i: int) -> int:
        return len(self.items[i].token_ids)

    def units(self, i: int) -> np.ndarray:
        return self.items[i].units.numpy()

    def token_ids(self, i: int) -> np.ndarray:
        return np.asarray(self.items[i].token_ids)

    def row_group(self, i: int) -> int:
        return 0

    def examples(self, indices) -> dict[int, Example]:
        return {i: self.items[i] for i in indices}


@dataclass
class Subset:
    """Some utterances of a split (``indices`` into ``source``)."""

    source: Split | InMemory
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)


def as_subset(data) -> Subset:
    """A Subset of all of ``data`` (a Split, an InMemory, a list of Examples or a Subset)."""
    if isinstance(data, Subset):
        return data
    source = InMemory(data) if isinstance(data, list) else data
    return Subset(source, list(range(len(source))))


def max_units_per_token(data) -> float:
    """The most target units per text token of any utterance of ``data`` (the free-running length cap)."""
    data = as_subset(data)
    return max(data.source.num_units(i) / max(1, data.source.num_text_tokens(i)) for i in data.indices)


def load_split(manifest_path, whisper_path, text_path, s3_path, speaker_path=None, words_path=None) -> tuple[Split, dict]:
    """Join the tables of a split on utt_id (lazily); an utterance missing from any of them is an error."""
    split = Split(manifest_path, whisper_path, text_path, s3_path, speaker_path, words_path)
    return split, split.meta


def speaker_split(data, val_speakers: int, seed: int) -> tuple[Subset, Subset]:
    """Hold out ``val_speakers`` whole speakers (chosen with the seed) for validation."""
    data = as_subset(data)
    spk = data.source.speaker_ids
    speakers = sorted({spk[i] for i in data.indices})
    if not 1 <= val_speakers < len(speakers):
        raise ValueError(f"train.val_speakers: {val_speakers} of {len(speakers)} train speakers leaves nothing to train or validate on")
    held = set(random.Random(seed).sample(speakers, val_speakers))
    return (Subset(data.source, [i for i in data.indices if spk[i] not in held]),
            Subset(data.source, [i for i in data.indices if spk[i] in held]))


def same_speaker_other_utterance(speaker_ids: list[str]) -> dict[int, int]:
    """Index -> the next utterance (cyclically, in split order) of the same speaker: the speaker-embedding
    leak control. A speaker with one utterance keeps its own."""
    by: dict[str, list[int]] = {}
    for i, s in enumerate(speaker_ids):
        by.setdefault(s, []).append(i)
    return {i: idx[(k + 1) % len(idx)] for idx in by.values() for k, i in enumerate(idx)}


def collate(examples: list[Example], speech_from: list[Example] | None = None,
            speaker_from: list[Example] | None = None) -> dict:
    """Pad a batch. ``speech_from``: take each item's Whisper states from another utterance (control);
    ``speaker_from``: its speaker embedding likewise. ``speaker`` (B, D) is there when the items have one."""
    speech = speech_from or examples
    voices = speaker_from or examples
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
    if all(e.durations is not None for e in examples):
        batch["durations"] = torch.zeros(B, L, dtype=torch.long)
        for i, e in enumerate(examples):
            batch["durations"][i, : len(e.durations)] = torch.from_numpy(np.asarray(e.durations, np.int64))
    has = [v.speaker is not None for v in voices]
    if all(has):
        batch["speaker"] = torch.stack([v.speaker.float() for v in voices])
    elif any(has):
        raise ValueError("a batch mixes utterances with and without a speaker embedding")
    return batch


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batches(data, batch_size: int, rng: random.Random | None = None, buffer_rows: int = 0) -> list[list[list[int]]]:
    """Batches of similar length (padding is cost), as source indices, grouped in windows.

    When the subset fits in ``buffer_rows`` (or it is 0) there is one window: the whole subset sorted by
    length, cut into batches, the batch order shuffled with ``rng``. Otherwise the source's row groups
    (shuffled with ``rng``) are taken a window of about ``buffer_rows`` utterances at a time and the
    same is done inside each window, so a loader holds one window, never the split. Without ``rng``
    (validation, test) the order is fixed.
    """
    data = as_subset(data)
    src = data.source
    key = lambda i: (src.num_units(i), src.utt_ids[i])  # noqa: E731

    def cut(indices: list[int]) -> list[list[int]]:
        order = sorted(indices, key=key)
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if rng is not None:
            rng.shuffle(groups)
        return groups

    if not buffer_rows or len(data) <= buffer_rows:
        return [cut(data.indices)]
    by_group: dict[int, list[int]] = {}
    for i in data.indices:
        by_group.setdefault(src.row_group(i), []).append(i)
    groups = sorted(by_group)
    if rng is not None:
        rng.shuffle(groups)
    windows, current = [], []
    for g in groups:
        current += by_group[g]
        if len(current) >= buffer_rows:
            windows.append(cut(current))
            current = []
    if current:
        windows.append(cut(current))
    return windows


def fixed_batches(data, batch_size: int, buffer_rows: int = 0, device: str = "cpu"):
    """(indices, padded batch on ``device``) in the fixed length-sorted order of ``batches`` without an
    rng, a window of Examples in memory at a time (evaluation, tokenizing, codebook initialisation)."""
    data = as_subset(data)
    for window in batches(data, batch_size, buffer_rows=buffer_rows):
        ex = data.source.examples([i for group in window for i in group])
        for group in window:
            yield group, to_device(collate([ex[i] for i in group]), device)


class _Windows(torch.utils.data.Dataset):
    """Item w: the Examples of window w (what one rank needs of it), for a DataLoader's workers."""

    def __init__(self, source, needs: list[list[int]]):
        self.source, self.needs = source, needs

    def __len__(self) -> int:
        return len(self.needs)

    def __getitem__(self, w: int) -> dict[int, Example]:
        return self.source.examples(self.needs[w])


def _reopen(_worker_id: int) -> None:
    source = torch.utils.data.get_worker_info().dataset.source
    if hasattr(source, "reopen"):  # a forked worker must not share the parent's file handles
        source.reopen()


def _as_is(window: dict[int, Example]) -> dict[int, Example]:
    return window


class Loader:
    """This rank's examples for each batch of a window plan (``batches``), one window in memory at a time.

    Under DDP each rank holds only its share of every batch (``share``), so memory per rank is its part
    of one window. With ``workers`` > 0 a DataLoader's worker processes read the next windows (Parquet
    row groups, validation, conversion) while the current one trains; windows still arrive in plan
    order, so the batches are the same as without workers, and memory holds up to ``1 + workers``
    windows.
    """

    def __init__(self, data, plan: list[list[list[int]]], rank: int = 0, world: int = 1, workers: int = 0):
        self.source = as_subset(data).source
        self.groups = [g for window in plan for g in window]
        self.window_of = [w for w, window in enumerate(plan) for _ in window]
        self.plan, self.rank, self.world, self.workers = plan, rank, world, workers
        self._window, self._cache = None, {}
        self._stream, self._next = None, None

    def __len__(self) -> int:
        return len(self.groups)

    def share(self, group: list[int]) -> tuple[list[int], float]:
        """This rank's items of a global batch and their weight; a rank left without any (a last batch
        smaller than the world) still takes part, with the first item and zero weight."""
        mine = group[self.rank :: self.world]
        return (mine, 1.0) if mine else (group[:1], 0.0)

    def _need(self, w: int) -> list[int]:
        return [i for g in self.plan[w] for i in self.share(g)[0]]

    def _read(self, w: int) -> dict[int, Example]:
        if not self.workers:
            return self.source.examples(self._need(w))
        if self._next != w:  # first use, or a jump (a resumed epoch starts mid-plan): stream from w on
            self._stream = iter(torch.utils.data.DataLoader(
                _Windows(self.source, [self._need(v) for v in range(len(self.plan))]), batch_size=None,
                sampler=range(w, len(self.plan)), num_workers=self.workers, prefetch_factor=1,
                collate_fn=_as_is, worker_init_fn=_reopen,
                # Its own generator: seeding the workers must not draw from torch's global one, which
                # the dropout masks use (workers would otherwise change the training).
                generator=torch.Generator().manual_seed(0)))
        self._next = w + 1
        return next(self._stream)

    def get(self, b: int) -> list[Example]:
        """This rank's share of batch ``b``."""
        w = self.window_of[b]
        if w != self._window:
            self._cache = {}  # drop the old window before reading the next one
            self._cache, self._window = self._read(w), w
        mine, _ = self.share(self.groups[b])
        return [self._cache[i] for i in mine]
