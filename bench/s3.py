"""S3 stage throughput: the project's batched tokenizer against CosyVoice's extraction shape, same run.

    python bench/s3.py [--manifest ...] [--batch-size 8] [--dtype bfloat16] [--device cuda]

Baseline: CosyVoice's tools/extract_speech_token.py shape - one utterance at a time, real length, float32.
Project:  S3Tokens as the s3 stage runs it (length-sorted batches, s3tokenizer padding, `s3.dtype`).
Weights:  the real ONNX cannot be fetched offline, so both sides run s3tokenizer's speech_tokenizer_v1
          with the SAME RANDOM WEIGHTS: speed is real, codes are not. Fidelity is measured on the encoder
          states before the quantizer, centered per utterance (random weights put most of every state
          in one constant direction); mean cosine per frame >= 0.99, else the ratio does not count.
Last line: `ratio: <project audio-s per s / baseline audio-s per s>`.
"""

import argparse

import numpy as np
import torch

from common import describe, speech_mix, timed
from taste_pipeline import hardware, params, s3

FIDELITY = 0.99


def main() -> None:
    p = params.load("s3")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="a resampled split's manifest.parquet (default: a synthesized length mix)")
    ap.add_argument("--batch-size", type=int, default=p.batch_size)
    ap.add_argument("--dtype", default=p.dtype)
    ap.add_argument("--device", default=p.device)
    ap.add_argument("--onnx", help="a real speech_tokenizer_v1.onnx, if you have one (then codes are compared too)")
    args = ap.parse_args()
    args.device = hardware.resolve_device(args.device, "s3.device")

    # s3tokenizer's encoder window is 30 s; longer utterances take its one-at-a-time long-audio path.
    audios = [a for a in speech_mix(args.manifest) if len(a) <= s3.MAX_SAMPLES]
    seconds = sum(len(a) for a in audios) / 16000
    print(f"mix: {describe(audios)}")
    print(f"machine: {torch.get_num_threads()} torch threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else f" ({hardware.cpu_description()})"))
    print("weights: " + (args.onnx if args.onnx else "RANDOM (speed and encoder-state fidelity only; codes are meaningless)"))
    torch.manual_seed(0)
    base = s3.S3Tokens(args.onnx, args.device, batch_size=1)
    proj = s3.S3Tokens(args.onnx, args.device, args.batch_size, args.dtype)
    proj.model.load_state_dict(base.model.state_dict())
    proj.encoder.load_state_dict(base.model.encoder.state_dict())

    def baseline():
        out = []
        for a in audios:  # one utterance, real length, float32: hidden states and codes
            mel = s3.log_mel(a)[None].to(args.device)
            with torch.inference_mode():
                h, n = base.model.encoder(mel, torch.tensor([mel.shape[-1]], device=args.device))
                out.append((h[0, : int(n[0])].float().cpu(), base.model.quantizer.encode(h)[0, : int(n[0])].cpu()))
        return out

    def project():
        hidden = proj.hidden(audios)
        return [(h.cpu(), proj.model.quantizer.encode(h[None])[0].cpu()) for h in hidden]

    def sync(fn):
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    sync(baseline), sync(project)  # warm-up
    ref, t_base = timed(sync, baseline)
    got, t_proj = timed(sync, project)
    # Centered: random weights give states dominated by one constant direction (cosine ~1 whatever
    # the precision), so compare what varies from frame to frame.
    cos = np.concatenate([torch.nn.functional.cosine_similarity(g - r.mean(0), r - r.mean(0), dim=-1).numpy()
                          for (g, _), (r, _) in zip(got, ref)])
    same = np.mean([float((gc == rc).float().mean()) for (_, gc), (_, rc) in zip(got, ref)])
    print(f"baseline (batch 1, real length, float32): {t_base:.2f} s, {seconds / t_base:.1f} audio-s/s")
    print(f"project  (batch {args.batch_size}, length-sorted, {args.dtype} -> {proj.dtype_name}): {t_proj:.2f} s, "
          f"{seconds / t_proj:.1f} audio-s/s")
    print(f"fidelity: encoder states, centered, mean cosine per frame {cos.mean():.4f} (min {cos.min():.4f}); "
          f"same code {same:.4f}" + ("" if args.onnx else " (random weights: not meaningful)"))
    ratio = t_base / t_proj
    if cos.mean() < FIDELITY:
        print(f"fidelity {cos.mean():.4f} < {FIDELITY}: the speed-up ({ratio:.2f}) does not count")
        ratio = 0.0
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
