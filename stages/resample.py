"""Stage resample: one split -> 16 kHz mono FLAC + manifest.parquet + rejects.parquet + repairs.parquet.

    python stages/resample.py <data.root> <split> <out_dir>

`data.format` says what the root holds: LibriSpeech-layout split folders, or lhotse manifests.
"""

import argparse
import os
import sys

from taste_pipeline import audio, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("split")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p, d = params.load("resample"), params.load("data")
    source = os.path.join(args.root, args.split)
    if d.format == "librispeech" and not os.path.isdir(source):
        sys.exit(f"data.root / data.splits: split folder {source} does not exist")
    kept, rejected = audio.resample_split(source, args.out_dir, strict=p.strict, silence_dbfs=p.silence_dbfs,
                                          fmt=d.format)
    print(f"{source} ({d.format}): {kept} utterances kept, {rejected} rejected (see {args.out_dir}/rejects.parquet)")
    if kept == 0:
        sys.exit(f"{source}: no usable utterance")


if __name__ == "__main__":
    main()
