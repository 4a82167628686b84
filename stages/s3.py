"""Stage s3: 50 Hz speech-token targets per utterance (S3, or the named stand-in).

    python stages/s3.py <manifest.parquet> <tokenizer_dir> <out.parquet> [--partial-dir DIR]

Finished row groups are kept in --partial-dir (outside DVC's outputs) until the table is whole.
"""

import argparse

from taste_pipeline import params, s3
from taste_pipeline.ranks import relaunch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out")
    ap.add_argument("--partial-dir", help="finished row groups of an interrupted run")
    args = ap.parse_args()
    p = params.load("s3")
    if relaunch(p.processes, "s3.processes"):
        return
    n = s3.tokenize_split(args.manifest, args.tokenizer_dir, args.out, p.device, p.batch_size, p.rows_per_group,
                         p.dtype, args.partial_dir)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
