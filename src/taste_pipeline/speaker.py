"""Stage speaker: one speaker embedding per utterance, which every variant's unit decoder reads.

TASTE's decoder (CosyVoice's LM layout) reads ``[sos, speaker embedding, fused text + TASTE tokens,
task, S3 units]``: the voice comes from the embedding, so neither the text-only baseline nor the
tokens have to guess or carry who is speaking. Encoders, by ``speaker.source``:

- ``pypi:resemblyzer`` (offline default): Resemblyzer's GE2E d-vector (256-d), whose weights ship in
  the PyPI package, on its own preprocessing (volume normalised, long silences cut by WebRTC's VAD).
- ``modelscope:<model id>`` (``iic/CosyVoice-300M``): CAM++ ``campplus.onnx`` (192-d), what TASTE reads,
  on CosyVoice's features (80-bin Kaldi fbank, mean-normalised over the utterance).
- a local path to ``campplus.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

RESEMBLYZER = "pypi:resemblyzer"
MODELSCOPE_PREFIX = "modelscope:"
CAMPPLUS_FILE = "campplus.onnx"


class Resemblyzer:
    """GE2E d-vectors from the ``resemblyzer`` package (weights inside it)."""

    width = 256

    def __init__(self):
        # torch >= 2.6 (pinned) loads the package's pretrained.pt with weights_only=True by default.
        import resemblyzer

        self.encoder = resemblyzer.VoiceEncoder(device="cpu", verbose=False)
        self.files = [Path(resemblyzer.__file__).parent / "pretrained.pt"]  # in the fingerprint

    # Partial windows per forward pass: the LSTM runs one batch of them instead of one per utterance
    # (6x faster on 2 cores; the embeddings agree with embed_utterance's to ~1e-7, float rounding).
    max_partials = 512

    def _partials(self, audio: np.ndarray) -> np.ndarray:
        """(n, 160, 40) mel windows of one utterance, as ``VoiceEncoder.embed_utterance`` cuts them."""
        from resemblyzer import audio as ra
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(audio.astype(np.float32))
        # The VAD may cut a short utterance to nothing; its untrimmed audio is then the better guess.
        if len(wav) < 1600:
            wav = audio.astype(np.float32)
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
        wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
        mel = ra.wav_to_mel_spectrogram(wav)
        return np.stack([mel[s] for s in mel_slices])

    def embed_many(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """``embed_utterance`` of each: the L2-normalised mean of its partial windows' d-vectors."""
        parts = [self._partials(a) for a in audios]
        flat = np.concatenate(parts)
        with torch.no_grad():
            vecs = np.concatenate([self.encoder(torch.from_numpy(flat[i : i + self.max_partials])).numpy()
                                   for i in range(0, len(flat), self.max_partials)])
        out, at = [], 0
        for p in parts:
            raw = vecs[at : at + len(p)].mean(axis=0)
            out.append((raw / np.linalg.norm(raw)).astype(np.float32))
            at += len(p)
        return out

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_many([audio])[0]


class CamPlus:
    """CAM++ (``campplus.onnx``, CosyVoice's speaker encoder) through onnxruntime, on CosyVoice's features."""

    def __init__(self, onnx_path: str | Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.width = int(self.session.get_outputs()[0].shape[-1])
        self.files = [Path(onnx_path)]

    def embed(self, audio: np.ndarray) -> np.ndarray:
        import torchaudio.compliance.kaldi as kaldi

        feat = kaldi.fbank(torch.from_numpy(audio.astype(np.float32))[None], num_mel_bins=80, dither=0,
                           sample_frequency=16000)
        feat = feat - feat.mean(dim=0, keepdim=True)
        out = self.session.run(None, {self.session.get_inputs()[0].name: feat[None].numpy()})[0]
        return np.asarray(out, np.float32).reshape(-1)

    def embed_many(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        return [self.embed(a) for a in audios]


def campplus_path(source: str) -> Path:
    """``campplus.onnx`` for a ModelScope id (downloaded; users with internet) or a local path."""
    if source.startswith(MODELSCOPE_PREFIX):
        from modelscope import snapshot_download

        path = Path(snapshot_download(source[len(MODELSCOPE_PREFIX):], allow_patterns=[CAMPPLUS_FILE])) / CAMPPLUS_FILE
    else:
        path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"speaker.source: {path} is not a file (expected {CAMPPLUS_FILE})")
    return path


def load(source: str):
    """The speaker encoder that ``speaker.source`` names: ``.embed(audio at 16 kHz) -> (width,)``."""
    return Resemblyzer() if source == RESEMBLYZER else CamPlus(campplus_path(source))


def embed_split(manifest_path: str | Path, out_path: str | Path, source: str, rows_per_group: int = 256) -> int:
    """Stage speaker: one embedding per utterance of the manifest (``extract.run``); returns the rows."""
    from . import extract, tables

    encoder = load(source)

    def encode(rows: list[dict], audios: list[np.ndarray]) -> dict[str, list]:
        embs = []
        for r, e in zip(rows, encoder.embed_many(audios)):
            if e.shape != (encoder.width,) or not np.isfinite(e).all():
                raise ValueError(f"speaker: utterance {r['utt_id']} ({r['audio_path']}): the encoder gave "
                                 f"{'a non-finite' if e.shape == (encoder.width,) else f'a {e.shape}'} embedding")
            embs.append(e.tolist())
        return {"emb": embs}

    meta = {"speaker.source": source, "speaker.width": str(encoder.width)}
    return extract.run("speaker", manifest_path, out_path, tables.speaker_schema(encoder.width), meta,
                       [source, rows_per_group], encode, rows_per_group, files=encoder.files)
