"""Stages train and finetune: one variant of train.variants / train.finetune on the train split; best
checkpoint by validation NLL.

    python stages/train.py <variant> <manifest> <whisper> <text> <s3> <model_dir> <live_dir> [--resume-dir DIR]
        [--init <model_dir of the variant it starts from>] [--speaker <speaker table of the train split>]
        [--words <true word timings of the train split>]

A run that is killed resumes from its last saved step when started again with the same params and
inputs (the state lives in --resume-dir, which DVC does not clear; see train.fit). Under
`torchrun --nproc_per_node=N` it trains with DistributedDataParallel; rank 0 writes everything.
"""

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from dvclive import Live

from taste_pipeline import checkpoint, data, hardware, params, train, train_params
from taste_pipeline.ranks import Ranks, relaunch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant")
    for table in ("manifest", "whisper", "text", "s3"):
        ap.add_argument(table, help=f"{table} table of the train split")
    ap.add_argument("model_dir")
    ap.add_argument("live_dir")
    ap.add_argument("--resume-dir", help="where the resume state is kept between a kill and a rerun")
    ap.add_argument("--init", help="model dir of the variant this one starts from (train.finetune.<name>.init)")
    ap.add_argument("--speaker", help="speaker table of the train split (the speaker stage's; train.speaker embedding)")
    ap.add_argument("--words", help="true word timings of the train split (the synthesize stage's; read by "
                                    "train.unit_alignment oracle only)")
    args = ap.parse_args()
    w, base = params.load("whisper"), params.load("base")
    p, init = train_params.load("train").variant(args.variant)
    if (init is None) != (args.init is None):
        sys.exit(f"train.finetune.{args.variant}.init is {init!r} but --init is {args.init!r}: run it as dvc.yaml does")
    if relaunch(p.processes, "train.processes"):
        return
    device = hardware.resolve_device(p.device, "train.device")
    ranks = Ranks.from_env("nccl" if device.startswith("cuda") else "gloo")
    device = ranks.device(device)
    # auto becomes concrete here: the fingerprint, the checkpoint and the DVCLive params all see that.
    amp = hardware.resolve_amp(p.amp, device)
    if ranks.rank == 0:
        print(hardware.describe(str(p.amp).lower(), amp, "train.amp", device))
    p = dataclasses.replace(p, device=device, amp=amp)
    if p.speaker != "none" and args.speaker is None:
        sys.exit(f"train.speaker: {p.speaker} needs --speaker (the speaker stage's table): run it as dvc.yaml does")
    words = args.words if p.unit_alignment == "oracle" else None
    if words is not None and not Path(words).is_file():
        sys.exit(f"train.unit_alignment: oracle reads true word timings, and {words} is not there (the synthesize "
                 "stage writes them for the embedded corpus; other corpora have none)")
    split, meta = data.load_split(args.manifest, args.whisper, args.text, args.s3,
                                  args.speaker if p.speaker != "none" else None, words)
    # The held-out speaker follows base.seed, not train.seed: seeds then differ only in initialization and
    # batch order, so a seed sweep compares variants on the same data.
    train_ex, val_ex = data.speaker_split(split, p.val_speakers, base.seed)
    model = train.build_model(int(meta["vocab_size"]), *split.widths, p, w.model, split.text_model,
                              data.max_units_per_token(train_ex), split.speaker_width)
    if args.init:
        got = train.init_from(model, args.init)
        print(f"{args.variant}: starts from {args.init} ({len(got['copied'])} tensors; fresh: {len(got['fresh'])})")
    parts = f"speech {p.speech}, squeeze {p.squeeze}, unit_alignment {p.unit_alignment}, speaker {p.speaker}"
    print(f"{args.variant} ({parts}): {model.num_params() / 1e6:.2f} M parameters; {len(train_ex)} train / "
          f"{len(val_ex)} validation utterances (speaker-disjoint); targets {meta['targets']}")
    lead = ranks.rank == 0
    with Live(args.live_dir, dvcyaml=None, save_dvc_exp=False) if lead else contextlib.nullcontext() as live:
        if lead:
            live.log_params({"variant": args.variant, "speech": p.speech, "squeeze": p.squeeze, "unit_alignment": p.unit_alignment, "speaker": p.speaker, "init": init or "", "seed": p.seed, "targets": meta["targets"], "amp": amp,
                             "device": device, "cpu": hardware.cpu_description()})
        fp = checkpoint.fingerprint(p, args.variant, [args.manifest, args.whisper, args.text, args.s3,
                                                     *([args.speaker] if args.speaker else []),
                                                     *([words] if words else [])])
        summary = train.fit(model, train_ex, val_ex, p, args.model_dir, live, args.resume_dir, fp, p.checkpoint_steps,
                            ranks)
        if lead:
            live.summary["best_val_nll"] = summary["best"]["val_nll"]
            live.summary["best_epoch"] = summary["best"]["epoch"]


if __name__ == "__main__":
    main()
