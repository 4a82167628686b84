"""Stage tokenize: the TASTE codes of a split, one row of rvq_levels codes per text token.

    python stages/tokenize_split.py <model_dir> <manifest> <whisper> <text> <out.parquet> [--partial-dir DIR]

Reads the split's whisper and text tables (not the audio) and the taste_rvq model of tokenize.model.
(Not stages/tokenize.py: a script's folder comes first on sys.path, and Python's own ``tokenize``
module would be shadowed.)
"""

import argparse

from taste_pipeline import tokenizer, train_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    for table in ("manifest", "whisper", "text"):
        ap.add_argument(table, help=f"{table} table of the split")
    ap.add_argument("out")
    ap.add_argument("--partial-dir", help="finished row groups of an interrupted run")
    args = ap.parse_args()
    p = train_params.load("tokenize")
    n = tokenizer.tokenize_split(args.model_dir, args.manifest, args.whisper, args.text, args.out, p.batch_size,
                                 p.device, p.rows_per_group, args.partial_dir)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
