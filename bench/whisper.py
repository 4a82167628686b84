"""Whisper stage throughput: the project's extraction against the assignment's way, same machine, same run.

    python bench/whisper.py [--manifest data/resampled/sample-test/manifest.parquet] [--window-s 10] ...

Baseline: one utterance at a time, zero-padded to Whisper's 30 s window, float32.
Project:  what the whisper stage runs with params.yaml's `whisper` section (batched windows of
          `windows_s` sizes, compute in `dtype`), unless overridden here.
Fidelity: cosine per frame of the mid and last states against the baseline, averaged over every
          frame of the mix (the worse of the two layers); the ratio counts only if it is >= 0.99.
          The worst utterance is printed too: short, mostly silent clips score lowest.
Last line: `ratio: <project audio-s per s / baseline audio-s per s>` (0 when fidelity fails).
"""

import argparse
import time

import numpy as np
import torch

from common import describe, speech_mix, timed
from taste_pipeline import params, whisper

FIDELITY = 0.99


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
    device = whisper.resolve_device(args.device)

    audios = speech_mix(args.manifest)
    seconds = sum(len(a) for a in audios) / 16000
    print(f"mix: {describe(audios)}")
    print(f"machine: {torch.get_num_threads()} torch threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""))
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
    per_frame = [np.minimum(cosines(m, rm), cosines(l, rl)) for (m, l), (rm, rl) in zip(got, ref)]
    fidelity = float(np.concatenate(per_frame).mean())
    worst, wi = min((float(c.mean()), i) for i, c in enumerate(per_frame))
    print(f"baseline (batch 1, 30 s window, float32): {t_base:.2f} s, {seconds / t_base:.1f} audio-s/s")
    print(f"project  (batch {args.batch_size}, windows {args.windows_s} s, {args.dtype}): {t_proj:.2f} s, "
          f"{seconds / t_proj:.1f} audio-s/s")
    print(f"fidelity: mean cosine per frame {fidelity:.4f}; worst utterance #{wi} "
          f"({len(audios[wi]) / 16000:.1f} s): {worst:.4f}")
    # Where the time goes: log-mel (numpy, proportional to padded window length) and the encoder, and
    # how many seconds of (padded) windows each side pushes through the encoder.
    for name, st, t in (("baseline", base, t_base), ("project ", proj, t_proj)):
        padded = sum(w.size for w in whisper.windows([len(a) for a in audios], st.sizes)) / 16000
        print(f"profile {name}: log-mel {st.extractor.seconds:.2f} s, encoder and rest {t - st.extractor.seconds:.2f} s; "
              f"{padded:.0f} s of padded windows for {seconds:.0f} s of audio")
    ratio = t_base / t_proj
    if fidelity < FIDELITY:
        print(f"fidelity {fidelity:.4f} < {FIDELITY}: the speed-up ({ratio:.2f}) does not count")
        ratio = 0.0
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
