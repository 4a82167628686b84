"""Stage speaker: one speaker embedding per utterance (the voice every variant's decoder is told).

    python stages/speaker.py <manifest.parquet> <out.parquet>
"""

import argparse

from taste_pipeline import params, speaker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("out")
    args = ap.parse_args()
    p = params.load("speaker")
    n = speaker.embed_split(args.manifest, args.out, p.source, p.rows_per_group)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
