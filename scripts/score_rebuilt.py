"""Score speech rebuilt outside the pipeline (``scripts/cosyvoice_rebuild.py``: CosyVoice's flow + HiFT on
S3 units) as the evaluate stage scores its own: WER (evaluate.asr_model), duration correlation, speaker
similarity, and each variant's share of the WER gap between text_only and the true units closed.

    python scripts/score_rebuilt.py rebuilt data/resampled/<test split>/manifest.parquet \
        data/features/speaker/<test split>.parquet [-o rebuilt/scores.json]
"""

import argparse
import json

from taste_pipeline import rebuild, train_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the folder cosyvoice_rebuild.py wrote (its index.json)")
    ap.add_argument("manifest", help="the test split's manifest")
    ap.add_argument("speaker", help="the test split's speaker table")
    ap.add_argument("-o", "--out", help="write the scores here as JSON")
    args = ap.parse_args()
    p = train_params.load("evaluate")
    scores = rebuild.score_folder(args.folder, args.manifest, args.speaker, p.asr_model, p.asr_window_s)
    finite = lambda v: {k: finite(x) for k, x in v.items()} if isinstance(v, dict) else (None if v != v else v)  # noqa: E731
    text = json.dumps(finite(scores), indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
