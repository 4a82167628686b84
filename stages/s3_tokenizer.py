"""Stage s3_tokenizer: fetch CosyVoice's S3 tokenizer, or fit the offline stand-in on the train split.

    python stages/s3_tokenizer.py <train manifest.parquet> <out_dir>
"""

import argparse

from taste_pipeline import params, s3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("train_manifest")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p, base = params.load("s3"), params.load("base")
    info = s3.prepare_tokenizer(p.source, args.out_dir, args.train_manifest, p.standin_units, base.seed,
                                p.standin_norm, p.standin_layer,
                                p.standin_model or params.load("whisper").model)
    print(f"targets: {info['name']}")


if __name__ == "__main__":
    main()
