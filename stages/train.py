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

from dvclive import Live

from taste_pipeline import hardware, params, train, train_params
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
    tables = {"manifest": args.manifest, "whisper": args.whisper, "text": args.text, "s3": args.s3,
              "speaker": args.speaker, "words": args.words}
    try:
        prep = train.prepare(args.variant, p, tables, w.model, base.seed, args.init)
    except FileNotFoundError as e:
        sys.exit(str(e))
    model, meta = prep.model, prep.meta
    if prep.init is not None:
        print(f"{args.variant}: starts from {args.init} ({len(prep.init['copied'])} tensors; fresh: {len(prep.init['fresh'])})")
    parts = f"speech {p.speech}, squeeze {p.squeeze}, unit_alignment {p.unit_alignment}, speaker {p.speaker}"
    print(f"{args.variant} ({parts}): {model.num_params() / 1e6:.2f} M parameters; {len(prep.train_ex)} train / "
          f"{len(prep.val_ex)} validation utterances (speaker-disjoint); targets {meta['targets']}")
    lead = ranks.rank == 0
    with Live(args.live_dir, dvcyaml=None, save_dvc_exp=False) if lead else contextlib.nullcontext() as live:
        if lead:
            live.log_params({"variant": args.variant, "speech": p.speech, "squeeze": p.squeeze, "unit_alignment": p.unit_alignment, "speaker": p.speaker, "init": init or "", "seed": p.seed, "targets": meta["targets"], "amp": amp,
                             "device": device, "cpu": hardware.cpu_description()})
        summary = train.fit(model, prep.train_ex, prep.val_ex, p, args.model_dir, live, args.resume_dir,
                            prep.fingerprint, p.checkpoint_steps, ranks)
        if lead:
            live.summary["best_val_nll"] = summary["best"]["val_nll"]
            live.summary["best_epoch"] = summary["best"]["epoch"]


if __name__ == "__main__":
    main()
