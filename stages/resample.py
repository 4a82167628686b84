"""Stage resample: one LibriSpeech-layout split -> 16 kHz mono FLAC + manifest.parquet + rejects.parquet.

    python stages/resample.py <split_dir> <out_dir>
"""

import argparse
import os
import sys

from taste_pipeline import audio, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("split_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = params.load("resample")
    if not os.path.isdir(args.split_dir):
        sys.exit(f"data.root / data.splits: split folder {args.split_dir} does not exist")
    kept, rejected = audio.resample_split(args.split_dir, args.out_dir, strict=p.strict, silence_dbfs=p.silence_dbfs)
    print(f"{args.split_dir}: {kept} utterances kept, {rejected} rejected (see {args.out_dir}/rejects.parquet)")
    if kept == 0:
        sys.exit(f"{args.split_dir}: no usable utterance")


if __name__ == "__main__":
    main()
