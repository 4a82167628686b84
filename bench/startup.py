"""What starting a stage process costs: each stage script's imports, timed by running it with --help.

    python bench/startup.py [--stages whisper text ...] [--repeat 2]

`make repro` starts one process per stage and split (22 with the defaults), so on a slow CPU the imports
alone are minutes of the budget. Baseline: a process that imports torch and nothing else (the floor every
stage pays). Prints seconds per stage (best of --repeat) and, as its last line,
`ratio: <mean stage start / torch import alone>`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["synthesize", "resample", "whisper", "text", "speaker", "s3_tokenizer", "s3", "train", "tokenize_split",
          "vocoder", "evaluate"]


def seconds(cmd: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    base = seconds([sys.executable, "-c", "import torch"], args.repeat)
    print(f"baseline: python -c 'import torch': {base:.1f} s")
    got = {}
    for stage in args.stages:
        got[stage] = seconds([sys.executable, f"stages/{stage}.py", "--help"], args.repeat)
        print(f"{stage}: {got[stage]:.1f} s")
    print(f"ratio: {statistics.mean(got.values()) / base:.2f}")


if __name__ == "__main__":
    main()
