"""Stage synthesize: write the embedded corpus (Kokoro-82M or espeak-ng speech) in LibriSpeech layout.

    python stages/synthesize.py <out_dir> [--words-dir DIR]

With --words-dir, each split's true word timings (Kokoro's phoneme durations, or espeak-ng's word
events) go to DIR/<split>.parquet.
"""

import argparse

from taste_pipeline import kokoro, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--words-dir", help="where each split's word timings table goes")
    args = ap.parse_args()
    base, data, p = params.load("base"), params.load("data"), params.load("synthesize")
    kokoro.synthesize_corpus(args.out_dir, data.train_split, data.test_split, p, base.seed, args.words_dir)


if __name__ == "__main__":
    main()
