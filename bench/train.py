"""Training throughput: the project's loop against the same model fed max-padded float32 batches.

    python bench/train.py [--utterances 96] [--batch-size 16] [--device cpu]

Both sides train the taste model of params.yaml's `train` section for one pass over the same synthetic
examples (random features with the corpus's shapes: a length mix of 2-16 s, ~3 text tokens per second;
throughput does not depend on the values). The model is built fresh (agg_init: fresh), so no Whisper
weights are needed; the cost is the same.
Baseline: every batch padded to the corpus-wide maximum length, float32.
Project:  length-sorted batches (data.batches), autocast as `train.amp` resolves on this machine
          (auto: bfloat16 only where it is native, else float32).
Prints where the time goes (data = collate + copy, forward, backward + optimizer) and, as its last
line, `ratio: <project target tokens per s / baseline target tokens per s>`.
"""

import argparse
import dataclasses
import random
import time

import numpy as np
import torch

from taste_pipeline import data, hardware, train, train_params


def synthetic(n: int, d_query: int, d_audio: int, vocab: int, seed: int = 0) -> list[data.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seconds = rng.uniform(2, 16)
        frames, tokens = int(seconds * 50), max(2, int(seconds * 3))
        out.append(data.Example(
            utt_id=f"u{i:04d}", speaker_id=str(i % 8), text="", token_ids=np.zeros(tokens, np.int64),
            text_emb=torch.from_numpy(rng.standard_normal((tokens, d_query), np.float32)).half(),
            mid=torch.from_numpy(rng.standard_normal((frames, d_audio), np.float32)).half(),
            last=torch.from_numpy(rng.standard_normal((frames, d_audio), np.float32)).half(),
            units=torch.from_numpy(rng.integers(0, vocab, frames)),
            speaker=torch.from_numpy(rng.standard_normal(256, np.float32))))
    return out


def pad_to(batch: dict, sizes: dict) -> dict:
    """Zero-pad each time axis of a collated batch to the corpus-wide maximum (lengths unchanged)."""
    out = dict(batch)
    for key, axis_len in sizes.items():
        x = batch[key]
        pad = [0, 0] * (x.dim() - 2) + [0, axis_len - x.shape[1]]
        out[key] = torch.nn.functional.pad(x, pad)
    return out


def run(model, examples, groups, cfg, device, amp: bool, pad: dict | None) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    t = {"data": 0.0, "forward": 0.0, "backward": 0.0}
    tokens = 0

    def tick():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    model.train()
    for group in groups:
        t0 = tick()
        batch = data.collate([examples[i] for i in group])
        if pad:
            batch = pad_to(batch, pad)
        batch = data.to_device(batch, device)
        t1 = tick()
        with train.autocast(device, amp):
            _, losses = model(batch)
        loss = losses["loss"]
        t2 = tick()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t3 = tick()
        t["data"] += t1 - t0
        t["forward"] += t2 - t1
        t["backward"] += t3 - t2
        tokens += int((batch["unit_len"] + 1).sum())  # units + END
    t["total"] = sum(t.values())
    t["tokens_per_s"] = tokens / t["total"]
    return t


def main() -> None:
    p = train_params.load("train")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=p.batch_size)
    ap.add_argument("--device", default=p.device)
    ap.add_argument("--amp", default=p.amp, help="train.amp for the project side (auto, bfloat16, float16, false)")
    args = ap.parse_args()
    device = hardware.resolve_device(args.device, "train.device")
    amp = hardware.resolve_amp({"true": True, "false": False}.get(str(args.amp).lower(), args.amp), device)
    cfg = dataclasses.replace(p, agg_init="fresh", batch_size=args.batch_size, device=device, amp=amp)
    examples = synthetic(args.utterances, 384, 384, 128)
    sizes = {"text_emb": max(len(e.text_emb) for e in examples), "mid": max(len(e.mid) for e in examples),
             "last": max(len(e.mid) for e in examples), "units": max(len(e.units) for e in examples)}
    print(f"data: {len(examples)} synthetic utterances, 2-16 s, batch {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} torch threads; {hardware.cpu_description()}")
    results = {}
    for name, amp, pad, groups in (
            ("baseline (max-padded, float32)", False, sizes,
             [list(range(i, min(i + args.batch_size, len(examples)))) for i in range(0, len(examples), args.batch_size)]),
            (f"project  (length-sorted, train.amp {args.amp} -> {amp})", amp, None,
             data.batches(examples, args.batch_size, random.Random(0))[0])):
        torch.manual_seed(0)
        model = train.build_model(128, 384, 384, dataclasses.replace(cfg, speech="tokens"), None).to(device)
        run(model, examples, groups[:2], cfg, device, amp, pad)  # warm-up
        r = run(model, examples, groups, cfg, device, amp, pad)
        results[name] = r
        print(f"{name}: {r['tokens_per_s']:.0f} target tokens/s; time {r['total']:.1f} s = data {r['data']:.1f} + "
              f"forward {r['forward']:.1f} + backward/optimizer {r['backward']:.1f}")
    base, proj = results.values()
    print(f"ratio: {proj['tokens_per_s'] / base['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
