"""Peak memory of a stage on N and 4N utterances: streaming keeps it flat.

    python bench/memory.py [--stage whisper|train|evaluate] [--n 24] [--seconds 20]

whisper: writes a resampled split of N (then 4N) copies of one `--seconds` s utterance and runs the real
stage script (params.yaml's `whisper` section, rows_per_group 8).
train / evaluate: writes the five tables of a split of N (then 4N) utterances of `--seconds` s with
random features of tiny.en's width (row groups of 8) and runs stages/train.py (a small model, one epoch,
`train.buffer_rows` 16) or stages/evaluate.py (`evaluate.buffer_rows` 16, on models trained first).
Each run is a fresh process; its peak RSS is read. A stage that held the split in memory would grow by
the size of its tables; one that streams row groups stays put.
Last line: `ratio: <peak RSS at 4N / peak RSS at N>` (target <= 1.3).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
import yaml

from common import make_tables, speech_mix
from taste_pipeline import params, tables

REPO = Path(__file__).resolve().parents[1]
# VmHWM, not getrusage's ru_maxrss: Linux carries the high-water mark of the memory a process had before
# exec into ru_maxrss, and a child that Python starts with vfork had the parent's, which here has just
# built the 4N tables (the 4N run then "peaked" at the parent's size: 1.31 where the stage was 1.05).
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
with open("/proc/self/status") as f:
    print("peak_rss_kb", next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")))
"""


def make_split(out: Path, utterance: np.ndarray, n: int) -> Path:
    rows = []
    for i in range(n):
        rel = Path("audio") / "1" / "1" / f"1-1-{i:04d}.flac"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / rel, utterance, tables.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append(dict(utt_id=f"1-1-{i:04d}", speaker_id="1", chapter_id="1", text="memory probe",
                         num_samples=len(utterance), duration=len(utterance) / tables.SAMPLE_RATE,
                         audio_path=rel.as_posix()))
    table = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in tables.MANIFEST}, schema=tables.MANIFEST)
    tables.write_table(out / "manifest.parquet", table, tables.MANIFEST)
    return out / "manifest.parquet"


def peak_rss_mb(script: str, args: list, workdir: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "stages" / script), *map(str, args)],
                         cwd=workdir, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script} failed:\n{out.stderr[-3000:]}")
    kb = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("peak_rss_kb")]
    return int(kb[-1]) / 1024


def model_stage(stage: str, t: dict[str, Path], workdir: Path) -> float:
    """Peak RSS of the train stage (taste) or of evaluate (after training both variants)."""
    def train_args(variant):
        return [variant, t["manifest"], t["whisper"], t["text"], t["s3"], workdir / "models" / variant,
                workdir / "live" / variant, "--speaker", t["speaker"]]
    if stage == "train":
        return peak_rss_mb("train.py", train_args("taste"), workdir)
    for variant in ("taste", "text_only"):
        peak_rss_mb("train.py", train_args(variant), workdir)
    return peak_rss_mb("evaluate.py", [t["manifest"], t["whisper"], t["text"], t["s3"], t["s3"], workdir / "models",
                                       workdir / "eval.json", workdir / "plots", "--speaker", t["speaker"]], workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["whisper", "train", "evaluate"], default="whisper")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    w = params.load("whisper", REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        doc = yaml.safe_load((REPO / "params.yaml").read_text())
        doc["whisper"]["rows_per_group"] = 8
        doc["train"].update(epochs=1, batch_size=8, d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=1,
                            agg_init="fresh", val_speakers=1, buffer_rows=16, warmup_steps=1)
        # The two variants it trains: the baseline (speech none) and the headline (speech tokens).
        doc["train"].update(variants={"taste": {"speech": "tokens"}, "text_only": {"speech": "none"}}, finetune={})
        doc["evaluate"].update(buffer_rows=16, attention_utterances=1)
        (tmp / "params.yaml").write_text(yaml.safe_dump(doc))
        utt = speech_mix(None, [args.seconds])[0] if args.stage == "whisper" else None
        peaks = {}
        for n in (args.n, 4 * args.n):
            work = tmp / f"run{n}"
            work.mkdir()
            (work / "params.yaml").write_text((tmp / "params.yaml").read_text())
            if args.stage == "whisper":
                manifest = make_split(tmp / f"n{n}", utt, n)
                peaks[n] = peak_rss_mb("whisper.py", [manifest, work / "w.parquet"], work)
            else:
                peaks[n] = model_stage(args.stage, make_tables(tmp / f"n{n}", n, args.seconds), work)
            size = tables.frames_for(args.seconds * tables.SAMPLE_RATE) * n * 384 * 2 * 2 / 2**20
            print(f"{args.stage}, {n} utterances x {args.seconds} s: peak RSS {peaks[n]:.0f} MB "
                  f"(whisper table {size:.0f} MB as float16)")
    if args.stage == "whisper":
        print(f"model {w.model}, windows {w.windows_s} s, {w.dtype}, rows_per_group 8")
    else:
        print("buffer_rows 16, row groups of 8, width 384")
    print(f"ratio: {peaks[4 * args.n] / peaks[args.n]:.2f}")


if __name__ == "__main__":
    main()
