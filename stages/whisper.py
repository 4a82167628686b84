"""Stage whisper: Whisper encoder states (mid layer = values, last layer = keys) per utterance.

    python stages/whisper.py <manifest.parquet> <out.parquet> [--partial-dir DIR]

Finished row groups are kept in --partial-dir (outside DVC's outputs) until the table is whole, so a
killed run resumes where it stopped. With whisper.processes > 1 (or under torchrun) the row groups
are shared out among the processes and joined into the same table.
"""

import argparse

from taste_pipeline import params, whisper
from taste_pipeline.ranks import relaunch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--partial-dir", help="finished row groups of an interrupted run")
    args = ap.parse_args()
    p = params.load("whisper")
    if relaunch(p.processes, "whisper.processes"):
        return
    n = whisper.extract_split(args.manifest, args.out, p, args.partial_dir)
    print(f"{args.out}: {n} utterances")


if __name__ == "__main__":
    main()
