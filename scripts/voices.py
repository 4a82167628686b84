"""How distinct the corpus's voices are to the pipeline's own speaker encoder.

    python scripts/voices.py [--out docs/results/voices.json]

Reads the speaker stage's tables (data/features/speaker/<split>.parquet: one embedding per utterance,
`dvc repro speaker` first); a speaker is the part of the utterance id before the first '-'. For every
test speaker it prints the mean cosine between its own utterances (within) and, for each train speaker,
the mean cosine between the two speakers' utterances; the nearest train speaker is the one with the
highest. A test speaker is a voice of its own when its within similarity is above its nearest train
speaker's. The train speakers' own within and nearest-other figures are printed beside, as the scale.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from taste_pipeline import hardware, params, tables

REPO = Path(__file__).resolve().parents[1]


def by_speaker(path: Path) -> dict[str, np.ndarray]:
    t = tables.read_speaker(path)
    emb = np.stack([np.asarray(e, dtype=np.float64) for e in t.column("emb").to_pylist()])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out: dict[str, list] = {}
    for utt, e in zip(t.column("utt_id").to_pylist(), emb):
        out.setdefault(utt.split("-")[0], []).append(e)
    return {k: np.stack(v) for k, v in sorted(out.items())}


def within(e: np.ndarray) -> float:
    sim = e @ e.T
    n = len(e)
    return float((sim.sum() - n) / (n * (n - 1))) if n > 1 else float("nan")


def between(a: np.ndarray, b: np.ndarray) -> float:
    return float((a @ b.T).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=str(REPO / "data" / "features" / "speaker"))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    d = params.load("data", REPO / "params.yaml")
    train = by_speaker(Path(args.features) / f"{d.train_split}.parquet")
    test = by_speaker(Path(args.features) / f"{d.test_split}.parquet")
    rows = []
    for name, e in test.items():
        near = max(train, key=lambda t: between(e, train[t]))
        rows.append({"speaker": name, "utterances": len(e), "within": round(within(e), 4),
                     "nearest_train": near, "nearest_train_sim": round(between(e, train[near]), 4)})
        print(f"test speaker {name} ({len(e)} utterances): within {rows[-1]['within']:.3f}, nearest train "
              f"speaker {near} {rows[-1]['nearest_train_sim']:.3f}")
    tw = [within(e) for e in train.values()]
    tn = [max(between(e, o) for k2, o in train.items() if k2 != k) for k, e in train.items()]
    print(f"train speakers ({len(train)}): within {np.mean(tw):.3f} (min {np.min(tw):.3f}); nearest other train "
          f"speaker {np.mean(tn):.3f} (max {np.max(tn):.3f})")
    if args.out:
        result = {"speaker.source": params.load("speaker", REPO / "params.yaml").source,
                  "synthesize.engine": params.load("synthesize", REPO / "params.yaml").engine,
                  "machine": hardware.cpu_description(), "test": rows,
                  "train": {"speakers": len(train), "within_mean": round(float(np.mean(tw)), 4),
                            "within_min": round(float(np.min(tw)), 4),
                            "nearest_other_mean": round(float(np.mean(tn)), 4),
                            "nearest_other_max": round(float(np.max(tn)), 4)}}
        with tables.atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
