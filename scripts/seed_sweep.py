"""Train and evaluate the default pipeline over several training seeds with `dvc exp run`, then print
mean and standard deviation of the headline metrics (topline included), of the share of the
text-to-topline gap taste closes (`gap_closed_*`, `speech_bits_per_s`) and of the taste - control gaps.

    python scripts/seed_sweep.py 1 2 3          # runs one experiment per seed (train + evaluate)
    python scripts/seed_sweep.py --report-only  # summarize experiments that already ran
    python scripts/seed_sweep.py --report-only --all-commits  # also experiments based on earlier commits
        (only when no dependency of the pipeline changed between those commits: `git diff A B -- dvc.yaml
        params.yaml stages src` is empty)

Each seed is an ordinary DVC experiment (`dvc exp run -S train.seed=N --name seed-N`), so
`dvc exp show` lists them too. The workspace result (default seed) counts as one of the seeds.
"""

import argparse
import json
import statistics
import subprocess

KEYS = ["top1_acc", "change_top1_acc", "nll", "text_only_top1_acc", "text_only_change_top1_acc", "text_only_nll",
        "shuffled_speech_top1_acc", "shuffled_speech_change_top1_acc", "shuffled_speech_nll", "copy_prev_top1_acc"]


def experiments(all_commits: bool = False) -> dict[str, dict]:
    cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
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


SYSTEM_METRICS = ("top1_acc", "change_top1_acc", "nll", "free_uer", "free_length_error", "free_no_end",
                  "speaker_swap_delta_nll", "rebuilt_wer", "rebuilt_duration_corr", "rebuilt_speaker_sim")
GAP_METRICS = ("speech_bits_per_s", "gap_closed_nll", "gap_closed_top1_acc", "gap_closed_change_top1_acc",
               "bitrate_bps", "dead_code_share", "rebuilt_wer_gap_closed")


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(runs: dict[str, dict]) -> dict:
    """Over one run per seed (the first seen): per system and metric (mean, sd); per variant and gap
    metric the values per seed and (mean, sd); the headline's gaps to each control per seed. A system
    or metric counts only when every run has it."""
    by_seed = {}
    for r in runs.values():
        by_seed.setdefault(r["seed"], r)
    rows = [by_seed[s] for s in sorted(by_seed)]
    systems = {"speech_frames": "speech_frames_", "taste": "", "taste_rvq": "taste_rvq_", "text_only": "text_only_",
               "shuffled_speech": "shuffled_speech_", "true_units": "true_units_"}
    table = {}
    for name, p in systems.items():
        got = {m: mean_sd([r[p + m] for r in rows]) for m in SYSTEM_METRICS if all(p + m in r for r in rows)}
        if got:  # the true units have only the rebuilt speech's scores
            table[name] = got
    gaps = {}
    for name in ("taste", "taste_rvq", "shuffled_speech"):
        p = systems[name]
        for m in GAP_METRICS:
            if all(p + m in r for r in rows):
                xs = [r[p + m] for r in rows]
                gaps[(name, m)] = {"per_seed": xs, "mean_sd": mean_sd(xs)}
    controls = {}
    for ctrl in ("text_only", "shuffled_speech"):
        for m, sign in (("change_top1_acc", 1), ("nll", -1)):
            xs = [sign * (r[m] - r[f"{ctrl}_{m}"]) for r in rows]
            controls[(ctrl, m)] = {"per_seed": xs, "mean_sd": mean_sd(xs)}
    return {"seeds": sorted(by_seed), "targets": rows[0].get("targets"), "num_utterances": rows[0].get("num_utterances"),
            "systems": table, "gaps": gaps, "controls": controls,
            "copy_prev_top1_acc": mean_sd([r["copy_prev_top1_acc"] for r in rows]),
            "original_wer": mean_sd([r["original_wer"] for r in rows]) if all("original_wer" in r for r in rows) else None}


def report(runs: dict[str, dict]) -> None:
    s = summarize(runs)
    print(f"seeds: {s['seeds']}; targets: {s['targets']}; test utterances: {s['num_utterances']}")
    fmt = lambda ms: f"{ms[0]:.4f} ± {ms[1]:.4f}"  # noqa: E731
    names = list(s["systems"])
    print("| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for m in SYSTEM_METRICS:
        if any(m in s["systems"][n] for n in names):
            print(f"| {m} | " + " | ".join(fmt(s["systems"][n][m]) if m in s["systems"][n] else "" for n in names) + " |")
    print(f"copy_prev top1_acc: {fmt(s['copy_prev_top1_acc'])}")
    if s["original_wer"]:
        print(f"WER of the original audio (the transcriber's floor): {fmt(s['original_wer'])}")
    for (name, m), g in s["gaps"].items():
        print(f"{name} {m}, per seed: {[round(x, 4) for x in g['per_seed']]}  mean {fmt(g['mean_sd'])}")
    for (ctrl, m), g in s["controls"].items():
        print(f"gap taste vs {ctrl} on {m} (positive = taste better), per seed: "
              f"{[round(x, 4) for x in g['per_seed']]}  mean {fmt(g['mean_sd'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("seeds", nargs="*", type=int)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--all-commits", action="store_true", help="count experiments of earlier commits too")
    args = ap.parse_args()
    if not args.report_only:
        for s in args.seeds:
            subprocess.run(["dvc", "exp", "run", "--temp", "-S", f"train.seed={s}", "--name", f"seed-{s}"], check=True)
    report(experiments(args.all_commits))


if __name__ == "__main__":
    main()
