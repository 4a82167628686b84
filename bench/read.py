"""Reading a split's frames, as training does each epoch: the project's tables and reader against
pyarrow's default writer options and a per-row reader.

    python bench/read.py [--n 128] [--seconds 12] [--repeat 3]
    python bench/read.py --split MANIFEST WHISPER TEXT S3     # a split the pipeline made (real states)

Both sides read every utterance's text embeddings and Whisper mid/last states through ``Split.examples``
(row groups of params.yaml's ``whisper.rows_per_group``, tiny.en's width, random float16 features unless
``--split`` names real tables, which are then written again both ways).
Baseline: the tables as ``pyarrow.parquet`` writes them by default (dictionary pages for every column),
          each row's matrix taken out of its row group one at a time (``tables.row_matrix``).
Project:  ``tables.write_table`` (``tables.write_options``) and ``Split.examples`` as the pipeline runs it.
Prints MB/s of float16 states and target units/s for each, the best of ``--repeat`` reads; as its last
line, `ratio: <project units per s / baseline units per s>`.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from common import make_tables
from taste_pipeline import data, params, tables

REPO = Path(__file__).resolve().parents[1]


class RowByRow(data.Split):
    """The baseline reader: each row's matrices taken out of its row group by ``tables.row_matrix``."""

    def examples(self, indices):
        want = sorted(set(indices))
        read = {}
        for name, f in self.files.items():
            cols = ["utt_id", "num_frames", "mid", "last"] if name == "whisper" else ["utt_id", "token_ids", "emb"]
            for g in sorted({self.where[name][i][0] for i in want}):
                read[name, g] = self.validators[name](f.read_row_group(g, columns=cols), f"{name} {g}")
        out = {}
        for i in want:
            (wg, wr), (tg, tr) = self.where["whisper"][i], self.where["text"][i]
            w, t = read["whisper", wg], read["text", tg]
            out[i] = data.Example(
                utt_id=self.utt_ids[i], speaker_id=self.speaker_ids[i], text=self.texts[i],
                token_ids=self._token_ids[i], text_emb=torch.from_numpy(tables.row_matrix(t, "emb", tr).copy()),
                mid=torch.from_numpy(tables.row_matrix(w, "mid", wr).copy()),
                last=torch.from_numpy(tables.row_matrix(w, "last", wr).copy()),
                units=torch.from_numpy(self._units[i].astype(np.int64)))
        return out


def rewrite(src: Path, dest: Path, project: bool, rows_per_group: int) -> Path:
    """``src`` written again, the project's way or pyarrow's default way."""
    table = pq.read_table(src)
    if project:
        tables.write_table(dest, table, table.schema, rows_per_group=rows_per_group)
    else:
        pq.write_table(table, dest, row_group_size=rows_per_group)
    return dest


def rate(cls, t: dict[str, Path], repeat: int) -> tuple[float, float, int]:
    """(best seconds to read every utterance, MB of float16 states read, target units)."""
    split = cls(t["manifest"], t["whisper"], t["text"], t["s3"])
    idx = list(range(len(split)))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        ex = split.examples(idx)
        best = min(best, time.perf_counter() - start)
    mb = sum(e.mid.numel() + e.last.numel() + e.text_emb.numel() for e in ex.values()) * 2 / 1e6
    return best, mb, sum(split.num_units(i) for i in idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seconds", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--split", nargs=4, type=Path, metavar=("MANIFEST", "WHISPER", "TEXT", "S3"))
    args = ap.parse_args()
    rows_per_group = params.load("whisper", REPO / "params.yaml").rows_per_group
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.split:
            src = dict(zip(("manifest", "whisper", "text", "s3"), args.split))
            what = f"{args.split[1]} and its split's tables"
        else:
            src = make_tables(tmp / "src", args.n, args.seconds, rows_per_group=rows_per_group)
            what = f"{args.n} utterances x {args.seconds} s, random float16 features of width 384"
        results = {}
        for label, project, cls in (("baseline", False, RowByRow), ("project", True, data.Split)):
            t = dict(src)
            for k in ("whisper", "text"):
                t[k] = rewrite(src[k], tmp / f"{label}-{k}.parquet", project, rows_per_group)
            seconds, mb, units = rate(cls, t, args.repeat)
            results[label] = units / seconds
            print(f"{label}: {mb:.0f} MB of states in {seconds:.3f} s = {mb / seconds:.0f} MB/s, "
                  f"{units / seconds:.0f} target units/s ({t['whisper'].stat().st_size / 1e6:.0f} MB file)")
    print(f"{what}; row groups of {rows_per_group}; best of {args.repeat}")
    print(f"ratio: {results['project'] / results['baseline']:.2f}")


if __name__ == "__main__":
    main()
