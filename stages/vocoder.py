"""Stage vocoder: the unit-to-mel decoder the evaluate stage rebuilds speech with (units + speaker
embedding -> log-mel; Griffin-Lim makes the waveform), trained on the train split's units.

    python stages/vocoder.py <manifest.parquet> <s3.parquet> <speaker.parquet> <model_dir> <metrics.json>
"""

import argparse
import json
from pathlib import Path

from taste_pipeline import params, tables, vocoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("manifest", "s3", "speaker", "model_dir", "metrics"):
        ap.add_argument(name)
    args = ap.parse_args()
    p = vocoder.load_params()
    seed = params.load("base").seed
    dataset, info = vocoder.load_training_set(args.manifest, args.s3, args.speaker)
    history = vocoder.train(dataset, info, p, seed, args.model_dir)
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps({"train_l1_standardized": history[-1]["train_l1_standardized"], "epochs": len(history),
                                   "targets": info["targets"]}, indent=2) + "\n")
    print(f"{args.model_dir}: train L1 {history[-1]['train_l1_standardized']:.4f} (standardized log-mel, after {len(history)} epochs)")


if __name__ == "__main__":
    main()
