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
    p = params.load("whisper")
    n = whisper.extract_split(args.manifest, args.out, p.model, p.mid_layer, p.batch_size, p.device, p.rows_per_group)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
