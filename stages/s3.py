"""Stage s3: 50 Hz speech-token targets per utterance (S3, or the named stand-in).

    python stages/s3.py <manifest.parquet> <tokenizer_dir> <out.parquet>
"""

import argparse

from taste_pipeline import params, s3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out")
    args = ap.parse_args()
    p = params.load("s3")
    n = s3.tokenize_split(args.manifest, args.tokenizer_dir, args.out, p.device, p.batch_size, dtype=p.dtype)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
