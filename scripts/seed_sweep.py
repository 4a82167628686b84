"""Train and evaluate the default pipeline over several training seeds with `dvc exp run`, then print
mean and standard deviation of the headline metrics (topline included), of the share of the
text-to-topline gap taste closes (`gap_closed_*`, `speech_bits_per_s`) and of the taste - control gaps.

    python scripts/seed_sweep.py 1 2 3          # runs one experiment per seed (train + evaluate)
    python scripts/seed_sweep.py --report-only  # summarize experiments that already ran

Each seed is an ordinary DVC experiment (`dvc exp run -S train.seed=N --name seed-N`), so
`dvc exp show` lists them too. The workspace result (default seed) counts as one of the seeds.
"""

import argparse
import json
import statistics
import subprocess

KEYS = ["top1_acc", "change_top1_acc", "nll", "text_only_top1_acc", "text_only_change_top1_acc", "text_only_nll",
        "shuffled_speech_top1_acc", "shuffled_speech_change_top1_acc", "shuffled_speech_nll", "copy_prev_top1_acc"]


def experiments() -> dict[str, dict]:
    out = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout)
    runs = {}
    for rev in out:
        # The workspace and the experiments; not the baseline commit, whose committed metrics may be stale.
        # An experiment still running (or queued, or failed) shows the workspace's metrics: skip it.
        candidates = ([rev] if rev.get("rev") == "workspace" else []) + [
            e for exp in (rev.get("experiments") or []) for e in exp.get("revs", [])
            if (exp.get("executor") or {}).get("state") in (None, "success")]
        for c in candidates:
            data = c.get("data") or {}
            seed = (((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}).get("train", {}).get("seed")
            metrics = (((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data")) or {}
            if seed is not None and metrics:
                runs[c.get("name") or data.get("rev", "?")] = {"seed": seed, **metrics}
    return runs


def report(runs: dict[str, dict]) -> None:
    by_seed = {}
    for r in runs.values():
        by_seed.setdefault(r["seed"], r)  # one row per seed
    rows = [by_seed[s] for s in sorted(by_seed)]
    print(f"seeds: {sorted(by_seed)}; targets: {rows[0].get('targets')}; test utterances: {rows[0].get('num_utterances')}")
    fmt = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"  # noqa: E731
    systems = [("taste", ""), ("text_only", "text_only_"), ("shuffled_speech", "shuffled_speech_")]
    if all("speech_frames_nll" in r for r in rows):
        systems.insert(0, ("speech_frames (topline)", "speech_frames_"))
    if all("taste_rvq_nll" in r for r in rows):
        systems.insert(2, ("taste_rvq", "taste_rvq_"))
    print("| metric | " + " | ".join(n for n, _ in systems) + " |\n|---|" + "---|" * len(systems))
    for m in ("top1_acc", "change_top1_acc", "nll", "free_uer", "free_length_error", "free_no_end"):
        if all(p + m in r for r in rows for _, p in systems if not p.startswith("shuffled")):
            print(f"| {m} | " + " | ".join(fmt([r[p + m] for r in rows]) if p + m in rows[0] else ""
                                           for _, p in systems) + " |")
    print(f"copy_prev top1_acc: {fmt([r['copy_prev_top1_acc'] for r in rows])}")
    # What taste (and the shuffled control) gets of what speech can add: per seed, then mean ± sd.
    for name, p in (("taste", ""), ("taste_rvq", "taste_rvq_"), ("shuffled_speech", "shuffled_speech_")):
        for m in ("speech_bits_per_s", "gap_closed_nll", "gap_closed_top1_acc", "gap_closed_change_top1_acc",
                  "bitrate_bps", "dead_code_share"):
            if all(p + m in r for r in rows):
                xs = [r[p + m] for r in rows]
                print(f"{name} {m}, per seed: {[round(x, 4) for x in xs]}  mean {fmt(xs)}")
    for ctrl in ("text_only", "shuffled_speech"):
        for m, sign in (("change_top1_acc", 1), ("nll", -1)):
            gaps = [sign * (r[m] - r[f"{ctrl}_{m}"]) for r in rows]
            print(f"gap taste vs {ctrl} on {m} (positive = taste better), per seed: "
                  f"{[round(g, 4) for g in gaps]}  mean {fmt(gaps)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("seeds", nargs="*", type=int)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for s in args.seeds:
            subprocess.run(["dvc", "exp", "run", "--temp", "-S", f"train.seed={s}", "--name", f"seed-{s}"], check=True)
    report(experiments())


if __name__ == "__main__":
    main()
