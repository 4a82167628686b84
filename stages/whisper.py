"""Stage whisper: Whisper encoder states (mid layer = values, last layer = keys) per utterance.

    python stages/whisper.py <manifest.parquet> <out.parquet>
"""

import argparse

from taste_pipeline import params, whisper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("out")
    args = ap.parse_args()
    n = whisper.extract_split(args.manifest, args.out, params.load("whisper"))
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
