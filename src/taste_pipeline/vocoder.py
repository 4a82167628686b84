"""Units back to speech, offline: a small unit-to-mel decoder (units + the speaker embedding -> log-mel)
and Griffin-Lim. It is the ear the evaluate stage listens with, not a TTS: its ceiling is measured
(the speech it rebuilds from each test utterance's true units), never assumed.

The decoder sees the whole unit sequence (no causal mask: it renders units already chosen), through a
stack of residual 1-d convolutions, and emits ``upsample`` mel frames per unit (two 10 ms hops per
20 ms unit). ``(x, x_len)`` travel together; padded positions are zeroed before every convolution, so
a batch gives each utterance what it would get alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import tables
from .params import ParamError
from .params import load as _load

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# Log-mel of 16 kHz audio: 80 bins to 8 kHz, 10 ms hop (two frames per 20 ms unit), 64 ms window.
MEL = {"sample_rate": tables.SAMPLE_RATE, "n_fft": 1024, "hop_length": 160, "n_mels": 80}
UPSAMPLE = tables.SAMPLES_PER_FRAME // MEL["hop_length"]
LOG_FLOOR = 1e-5
MIN_FRAMES = 2 + MEL["n_fft"] // MEL["hop_length"]  # the shortest mel Griffin-Lim's STFT can pad


@dataclass(frozen=True)
class Vocoder:
    """params.yaml's ``vocoder`` section (the vocoder stage; evaluate reads griffin_lim_iters)."""

    d_model: int = 128
    n_layers: int = 4
    kernel: int = 5
    dropout: float = 0.1
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.002
    griffin_lim_iters: int = 32

    def check(self):
        for name in ("d_model", "n_layers", "epochs", "batch_size", "griffin_lim_iters"):
            if getattr(self, name) < 1:
                raise ParamError(f"vocoder.{name}: must be at least 1, got {getattr(self, name)}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ParamError(f"vocoder.kernel: must be odd (the convolutions keep the length), got {self.kernel}")
        if not 0 <= self.dropout < 1:
            raise ParamError(f"vocoder.dropout: must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ParamError(f"vocoder.lr: must be positive, got {self.lr}")


SECTIONS = {"vocoder": Vocoder}


def load_params(path: str | Path = "params.yaml") -> Vocoder:
    """params.yaml's ``vocoder`` section (here, not in ``params``: a vocoder change re-runs no extraction)."""
    return _load("vocoder", path, SECTIONS)


@dataclass(frozen=True)
class VocoderArgs:
    """What the checkpoint needs to rebuild the decoder (saved beside its weights)."""

    vocab_size: int
    speaker_dim: int
    d_model: int = 128
    n_layers: int = 4
    kernel: int = 5
    dropout: float = 0.1
    n_mels: int = MEL["n_mels"]
    upsample: int = UPSAMPLE


class ConvBlock(nn.Module):
    def __init__(self, d: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, kernel, padding=kernel // 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * mask[..., None]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.drop(nn.functional.gelu(h))


class UnitToMel(nn.Module):
    def __init__(self, args: VocoderArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.speaker = nn.Linear(args.speaker_dim, args.d_model)
        self.blocks = nn.ModuleList(ConvBlock(args.d_model, args.kernel, args.dropout) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.d_model)
        self.out = nn.Linear(args.d_model, args.n_mels * args.upsample)
        # Per mel bin, the train split's mean and spread: the decoder predicts standardized log-mel (the
        # first epoch is not spent learning the offset); saved with the weights.
        self.register_buffer("mel_mean", torch.zeros(args.n_mels))
        self.register_buffer("mel_std", torch.ones(args.n_mels))

    def forward(self, units: torch.Tensor, units_len: torch.Tensor, speaker: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """units (B, T) ints, units_len (B,), speaker (B, speaker_dim) -> log-mel (B, T * upsample, n_mels)
        and its lengths."""
        mask = (torch.arange(units.shape[1], device=units.device)[None] < units_len[:, None]).float()
        x = self.embed(units) + self.speaker(speaker)[:, None]
        for block in self.blocks:
            x = block(x, mask)
        y = self.out(self.norm(x)).view(units.shape[0], -1, self.args.n_mels)
        return y * self.mel_std + self.mel_mean, units_len * self.args.upsample


def mel_transform() -> nn.Module:
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(power=1.0, norm="slaney", mel_scale="slaney", **MEL)


def log_mel(audio: np.ndarray, num_units: int, transform: nn.Module | None = None) -> np.ndarray:
    """The decoder's target for an utterance of ``num_units`` units: (num_units * UPSAMPLE, n_mels), the
    audio's log-mel cut or padded (with silence) to the unit clock."""
    transform = transform or mel_transform()
    with torch.no_grad():
        m = transform(torch.from_numpy(np.asarray(audio, dtype=np.float32))).T  # (frames, n_mels)
    m = torch.log(m.clamp(min=LOG_FLOOR))
    want = num_units * UPSAMPLE
    if len(m) < want:
        m = torch.cat([m, m.new_full((want - len(m), m.shape[1]), math.log(LOG_FLOOR))])
    return m[:want].numpy()


class GriffinLim:
    """Log-mel -> 16 kHz waveform: the mel filterbank inverted by least squares, then Griffin-Lim from a
    fixed (zero-phase) start, so the same mel always gives the same audio."""

    def __init__(self, iters: int = 32):
        import torchaudio

        n_stft = MEL["n_fft"] // 2 + 1
        self.inverse = torchaudio.transforms.InverseMelScale(n_stft, MEL["n_mels"], MEL["sample_rate"],
                                                             norm="slaney", mel_scale="slaney")
        self.gl = torchaudio.transforms.GriffinLim(n_fft=MEL["n_fft"], hop_length=MEL["hop_length"], power=1.0,
                                                   n_iter=iters, rand_init=False)

    @torch.no_grad()
    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        mel = torch.as_tensor(mel, dtype=torch.float32)
        frames = len(mel)
        # Silence after the end: Griffin-Lim's STFT pads by half a window (needs > 512 samples), and the
        # waveform then spans every frame (frames x hop samples, units x 20 ms) before it is cut there.
        pad = mel.new_full((max(1, MIN_FRAMES - frames), mel.shape[1]), math.log(LOG_FLOOR))
        spec = self.inverse(torch.cat([mel, pad]).exp().T).clamp(min=0)
        wav = self.gl(spec)[: frames * MEL["hop_length"]]
        return (wav / max(1.0, float(wav.abs().max()))).numpy()  # never clip


# ---------------------------------------------------------------------------------------------
# Training (the vocoder stage)


class UnitMelSet(torch.utils.data.Dataset):
    def __init__(self, units: list[np.ndarray], mels: list[np.ndarray], speakers: np.ndarray):
        self.units, self.mels, self.speakers = units, mels, speakers

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int):
        return self.units[i], self.mels[i], self.speakers[i]


def collate(items) -> dict[str, torch.Tensor]:
    units, mels, speakers = zip(*items)
    lengths = torch.tensor([len(u) for u in units])
    u = torch.zeros(len(units), int(lengths.max()), dtype=torch.long)
    m = torch.zeros(len(units), int(lengths.max()) * UPSAMPLE, mels[0].shape[1])
    for i, (a, b) in enumerate(zip(units, mels)):
        u[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.int64))
        m[i, : len(b)] = torch.from_numpy(b)
    return {"units": u, "units_len": lengths, "mel": m, "speaker": torch.from_numpy(np.stack(speakers))}


class LengthBatches(torch.utils.data.Sampler):
    """Batches of similar length (little padding), in an order drawn anew each epoch from ``seed``."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        order = np.argsort(lengths, kind="stable")
        self.batches = [order[i: i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter([self.batches[i] for i in torch.randperm(len(self.batches), generator=g).tolist()])


def masked_l1(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(pred.shape[1])[None] < lengths[:, None]).float()[..., None]
    return ((pred - target).abs() * mask).sum() / (mask.sum() * pred.shape[2])


def load_training_set(manifest_path: str, s3_path: str, speaker_path: str) -> tuple[UnitMelSet, dict]:
    """Units, log-mel targets and speaker embeddings of a split, joined on utt_id; a unit or speaker
    table missing an utterance of the manifest fails naming it."""
    from tqdm import tqdm

    from . import audio

    manifest = tables.read_manifest(manifest_path)
    s3 = tables.read_s3(s3_path)
    spk = tables.read_speaker(speaker_path)
    units = dict(zip(s3.column("utt_id").to_pylist(), s3.column("tokens").to_pylist()))
    embs = dict(zip(spk.column("utt_id").to_pylist(), spk.column("emb").to_pylist()))
    rows = manifest.to_pylist()
    for what, have, path in (("units", units, s3_path), ("speaker embedding", embs, speaker_path)):
        missing = [r["utt_id"] for r in rows if r["utt_id"] not in have]
        if missing:
            raise ValueError(f"{path}: no {what} for {len(missing)} utterances of {manifest_path}, e.g. {missing[:3]}")
    transform = mel_transform()
    base = Path(manifest_path).parent
    mels = [log_mel(audio.load_utterance(base, r), len(units[r["utt_id"]]), transform)
            for r in tqdm(rows, desc="vocoder: log-mel", unit="utt")]
    meta = s3.schema.metadata or {}
    info = {"vocab_size": int(meta[b"vocab_size"]), "targets": meta[b"targets"].decode(),
            "speaker": ((spk.schema.metadata or {}).get(b"speaker.source") or b"").decode()}
    return UnitMelSet([np.asarray(units[r["utt_id"]]) for r in rows], mels,
                      np.asarray([embs[r["utt_id"]] for r in rows], dtype=np.float32)), info


def train(dataset: UnitMelSet, info: dict, p: Vocoder, seed: int, out_dir: str | Path) -> list[dict]:
    """Fits the decoder (AdamW, cosine schedule, fixed epochs) and saves it; returns per-epoch L1."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    args = VocoderArgs(vocab_size=info["vocab_size"], speaker_dim=dataset.speakers.shape[1], d_model=p.d_model,
                       n_layers=p.n_layers, kernel=p.kernel, dropout=p.dropout)
    model = UnitToMel(args)
    frames = np.concatenate(dataset.mels)
    model.mel_mean.copy_(torch.from_numpy(frames.mean(0)))
    model.mel_std.copy_(torch.from_numpy(frames.std(0) + 1e-3))
    sampler = LengthBatches([len(u) for u in dataset.units], p.batch_size, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01)
    steps = p.epochs * len(sampler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    history = []
    for epoch in range(p.epochs):
        model.train()
        total, n = 0.0, 0
        for batch in tqdm(loader, desc=f"vocoder epoch {epoch + 1}/{p.epochs}", unit="batch"):
            pred, lengths = model(batch["units"], batch["units_len"], batch["speaker"])
            loss = masked_l1((pred - model.mel_mean) / model.mel_std, (batch["mel"] - model.mel_mean) / model.mel_std, lengths)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, n = total + float(loss.detach()) * len(lengths), n + len(lengths)
        history.append({"epoch": epoch + 1, "train_l1_standardized": total / n})
    save(model, out_dir, {**info, "history": history})
    return history


def save(model: UnitToMel, out_dir: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(out_dir / MODEL_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with tables.atomic_path(out_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({"vocoder_args": dataclasses.asdict(model.args), "mel": MEL, **info}, indent=2) + "\n")


def load(model_dir: str | Path) -> tuple[UnitToMel, dict]:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"no vocoder in {model_dir}: run the vocoder stage first")
    info = json.loads((model_dir / CONFIG_FILE).read_text())
    if info.get("mel") != MEL:
        raise ValueError(f"{model_dir}: made for log-mel {info.get('mel')}, this version renders {MEL}: "
                         f"re-run the vocoder stage")
    model = UnitToMel(VocoderArgs(**info["vocoder_args"]))
    model.load_state_dict(load_file(str(model_dir / MODEL_FILE)))
    return model.eval(), info


class Rebuilder:
    """Units + speaker embedding -> 16 kHz speech (the trained decoder, then Griffin-Lim)."""

    def __init__(self, model_dir: str | Path, griffin_lim_iters: int = 32):
        self.model, self.info = load(model_dir)
        self.vocoder = GriffinLim(griffin_lim_iters)

    @torch.no_grad()
    def mel(self, units: np.ndarray, speaker: np.ndarray) -> np.ndarray:
        u = torch.as_tensor(np.asarray(units, dtype=np.int64))[None]
        mel, _ = self.model(u, torch.tensor([u.shape[1]]), torch.as_tensor(speaker, dtype=torch.float32)[None])
        return mel[0].numpy()

    def __call__(self, units: np.ndarray, speaker: np.ndarray) -> np.ndarray:
        if len(units) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.vocoder(self.mel(units, speaker)).astype(np.float32)
