"""Peak memory of the whisper stage on N and 4N utterances: streaming keeps it flat.

    python bench/memory.py [--n 24] [--seconds 20]

Writes a resampled split of N (then 4N) copies of one `--seconds` s utterance, runs the real stage
script (stages/whisper.py, params.yaml's `whisper` section with rows_per_group 8) in a fresh process
each time, and reads that process's peak RSS. A stage that held the split in memory would grow by the
size of its table (frames x width x 2 layers); one that streams row groups stays put.
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

from common import speech_mix
from taste_pipeline import params, tables

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
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


def peak_rss_mb(manifest: Path, workdir: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "stages" / "whisper.py"), str(manifest),
                          str(workdir / f"{manifest.parent.name}.parquet")],
                         cwd=workdir, check=True, capture_output=True, text=True)
    kb = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("peak_rss_kb")]
    return int(kb[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    w = params.load("whisper", REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        doc = yaml.safe_load((REPO / "params.yaml").read_text())
        doc["whisper"]["rows_per_group"] = 8
        (tmp / "params.yaml").write_text(yaml.safe_dump(doc))
        utt = speech_mix(None, [args.seconds])[0]
        peaks = {}
        for n in (args.n, 4 * args.n):
            manifest = make_split(tmp / f"n{n}", utt, n)
            peaks[n] = peak_rss_mb(manifest, tmp)
            t = tables.read_whisper(tmp / f"n{n}.parquet")
            width = t.schema.field("last").type.value_type.list_size
            print(f"{n} utterances x {args.seconds} s: peak RSS {peaks[n]:.0f} MB "
                  f"(table {tables.frames_for(len(utt)) * n * width * 2 * 4 / 2**20:.0f} MB if held as float32)")
    print(f"model {w.model}, windows {w.windows_s} s, {w.dtype}, rows_per_group 8")
    print(f"ratio: {peaks[4 * args.n] / peaks[args.n]:.2f}")


if __name__ == "__main__":
    main()
