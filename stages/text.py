"""Stage text: text token ids and their embeddings (the aggregator's queries) per utterance.

    python stages/text.py <manifest.parquet> <out.parquet>
"""

import argparse

from taste_pipeline import params, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("out")
    args = ap.parse_args()
    p = params.load("text")
    n = text.extract_split(args.manifest, args.out, p.model, p.case, p.rows_per_group)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
