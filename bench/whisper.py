"""Whisper stage throughput: the project's extraction against the assignment's way, same machine, same run.

    python bench/whisper.py [--manifest data/resampled/sample-test/manifest.parquet] [--window-s 10] ...

Baseline: one utterance at a time, zero-padded to Whisper's 30 s window, float32.
Project:  what the whisper stage runs with params.yaml's `whisper` section (batched windows of
          `windows_s` sizes, compute in `dtype`), unless overridden here.
Fidelity: cosine per frame of each stored layer (mid and last) against the baseline. Per layer, the
          mean over every frame of the mix must be >= 0.99, and every utterance's own mean >= 0.98
          (short, mostly silent clips score lowest); the ratio counts only if both hold.
Last line: `ratio: <project audio-s per s / baseline audio-s per s>` (0 when fidelity fails).
"""

import argparse
import time

import numpy as np
import torch

from common import describe, speech_mix, timed
from taste_pipeline import hardware, params, whisper

FIDELITY = 0.99  # mean over every frame, per layer
WORST_UTTERANCE = 0.98  # each utterance's mean, per layer


class Timed:
    """The feature extractor, with the seconds spent in it."""

    def __init__(self, extractor):
        self.extractor, self.seconds = extractor, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.extractor(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def main() -> None:
    p = params.load("whisper")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="a resampled split's manifest.parquet (default: a synthesized length mix)")
    ap.add_argument("--model", default=p.model)
    ap.add_argument("--windows-s", type=int, nargs="+", default=p.windows_s)
    ap.add_argument("--dtype", default=p.dtype)
    ap.add_argument("--batch-size", type=int, default=p.batch_size)
    ap.add_argument("--device", default=p.device)
    args = ap.parse_args()
    device = hardware.resolve_device(args.device, "whisper.device")

    audios = speech_mix(args.manifest)
    seconds = sum(len(a) for a in audios) / 16000
    print(f"mix: {describe(audios)}")
    print(f"machine: {torch.get_num_threads()} torch threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else f" ({hardware.cpu_description()})"))
    model = whisper.load_model(args.model)
    ext = whisper.load_feature_extractor(args.model, model.config.num_mel_bins)
    base = whisper.WhisperStates(model, Timed(ext), p.mid_layer, batch_size=1, device=device)
    proj = whisper.WhisperStates(model, Timed(ext), p.mid_layer, args.batch_size, device, args.windows_s, args.dtype)

    def run(states):
        out = [states([a])[0] for a in audios] if states is base else states(audios)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    run(base), run(proj)  # warm-up: first calls pay for allocation and kernel choice
    base.extractor.seconds = proj.extractor.seconds = 0.0
    ref, t_base = timed(run, base)
    got, t_proj = timed(run, proj)
    layers = {"mid": 0, "last": 1}
    per_frame = {name: [cosines(g[k], r[k]) for g, r in zip(got, ref)] for name, k in layers.items()}
    means = {name: float(np.concatenate(c).mean()) for name, c in per_frame.items()}
    worst, wl, wi = min((float(c.mean()), name, i) for name, cs in per_frame.items() for i, c in enumerate(cs))
    print(f"baseline (batch 1, 30 s window, float32): {t_base:.2f} s, {seconds / t_base:.1f} audio-s/s")
    print(f"project  (batch {args.batch_size}, windows {args.windows_s} s, {args.dtype} -> {proj.dtype_name}): "
          f"{t_proj:.2f} s, {seconds / t_proj:.1f} audio-s/s")
    print("fidelity: mean cosine per frame " + ", ".join(f"{n} {v:.4f}" for n, v in means.items())
          + f"; worst utterance #{wi} ({len(audios[wi]) / 16000:.1f} s, {wl}): {worst:.4f}")
    # Where the time goes: log-mel (numpy, proportional to padded window length) and the encoder, and
    # how many seconds of (padded) windows each side pushes through the encoder.
    for name, st, t in (("baseline", base, t_base), ("project ", proj, t_proj)):
        padded = sum(w.size for w in whisper.windows([len(a) for a in audios], st.sizes)) / 16000
        print(f"profile {name}: log-mel {st.extractor.seconds:.2f} s, encoder and rest {t - st.extractor.seconds:.2f} s; "
              f"{padded:.0f} s of padded windows for {seconds:.0f} s of audio")
    ratio = t_base / t_proj
    if min(means.values()) < FIDELITY or worst < WORST_UTTERANCE:
        print(f"fidelity below mean {FIDELITY} / worst utterance {WORST_UTTERANCE}: the speed-up ({ratio:.2f}) does not count")
        ratio = 0.0
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
