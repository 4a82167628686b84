"""How the share of the gap closed grows with the training corpus, for the default configuration (each
token's duration coded beside it) and for TASTE's design (the decoder finds its place in the text
itself). One `dvc exp run --temp` per (corpus size, seed) trains the default variants plus TASTE's
design (``taste_plain``, ``taste_plain_rvq``, as in scripts/anatomy.py), all scored by one evaluate
on the same test split: the embedded corpus nests (src/taste_pipeline/corpus.py), so every size has
the same test split and each size's train split starts with the smaller ones'.

    python scripts/scaling.py --sizes 250 500 1000 2000 --seeds 1337 1 2   # run what is missing, report
    python scripts/scaling.py --report-only                                # table, fit and plots

Every finished run is appended to the results file (default docs/results/scaling.json) with its commit,
machine and precision (a point is a size, a seed and a precision: a seed run again in another precision
is another row), so a stopped study resumes where it stopped and the table does not depend on
experiments kept in the repository. Runs need a clean checkout: each point is committed code.
Then the table (markdown, printed), docs/results/scaling.csv and scaling_wer.csv (the DVC plots) and
docs/results/scaling.png: the share of the NLL gap closed against training utterances on a log axis,
with a least-squares line in log10(size) per configuration and where it would cross TASTE's design
reaching the default's share and 40 % (extrapolation, beyond the sizes measured); beside it the share
of the rebuilt speech's WER gap each headline variant closes, per seed and with its mean per size, and
no line: from 16 rebuilt utterances it moves with the seed more than with the size.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from taste_pipeline.tables import atomic_path  # noqa: E402  (src/ is not installed for scripts)
EXTRA = {
    "train.variants.taste_plain": "{speech: tokens, unit_alignment: none}",
    "train.finetune.taste_plain_rvq": "{squeeze: rvq, init: taste_plain, lr: 0.0005, epochs: 4, warmup_steps: 50, "
                                      "unit_alignment: none}",
}
# (configuration, variant, eval.json prefix); the shares are of the gap text_only -> speech_frames
SERIES = [("default", "taste_rvq", "taste_rvq_"), ("default", "taste", ""),
          ("TASTE's design", "taste_plain_rvq", "taste_plain_rvq_"), ("TASTE's design", "taste_plain", "taste_plain_")]
HEADLINE = {"default": "taste_rvq", "TASTE's design": "taste_plain_rvq"}
GOAL = 0.40
PREFIX = "scale-"
PATHS_THAT_MAKE_A_POINT = ["dvc.yaml", "params.yaml", "stages", "src"]


def name(size: int, seed: int) -> str:
    return f"{PREFIX}{size}-seed-{seed}"


def machine(sets: list[str]) -> dict:
    """Where and in what precision the run trained (train.device and train.amp as the run resolves them)."""
    import torch

    from taste_pipeline import hardware, train_params

    p = train_params.load("train", ROOT / "params.yaml")
    device = next((s.split("=", 1)[1] for s in sets if s.startswith("train.device=")), p.device)
    device = hardware.resolve_device(device, "train.device")
    amp = next((s.split("=", 1)[1] for s in sets if s.startswith("train.amp=")), p.amp)
    amp = {"true": True, "false": False}.get(str(amp).lower(), amp)
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
        where = f"{model}, {len(os.sched_getaffinity(0))} cores, {hardware.cpu_description()}"
    return {"device": device, "machine": where, "precision": hardware.resolve_amp(amp, device)}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def finished(exp: str) -> tuple[dict, str]:
    """(metrics/eval.json, baseline commit) of a finished experiment of this name, or ({}, "")."""
    out = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout)
    for rev in out:
        for e in rev.get("experiments") or []:
            for r in e.get("revs", []):
                if r.get("name") == exp and (e.get("executor") or {}).get("state") in (None, "success"):
                    data = ((r.get("data") or {}).get("metrics") or {}).get("metrics/eval.json", {}).get("data")
                    if data:
                        return data, rev.get("rev", "")
    return {}, ""


def run(size: int, seed: int, sets: list[str], results: Path) -> None:
    """Run one point (unless its experiment finished before the results file heard of it) and record it."""
    metrics, commit = finished(name(size, seed))
    where = machine(sets)
    if not metrics:
        dirty = git("status", "--porcelain", "--", *PATHS_THAT_MAKE_A_POINT)
        if dirty:
            sys.exit(f"scaling: the pipeline has uncommitted changes, so a point would not be committed code:\n{dirty}")
        args = [x for k, v in EXTRA.items() for x in ("-S", f"+{k}={v}")] + [x for s in sets for x in ("-S", s)]
        subprocess.run(["dvc", "exp", "run", "--temp", *args, "-S", f"synthesize.train_utterances={size}",
                        "-S", f"train.seed={seed}", "--name", name(size, seed)], cwd=ROOT, check=True)
        metrics, commit = finished(name(size, seed))
        if not metrics:
            sys.exit(f"scaling: experiment {name(size, seed)} finished without metrics/eval.json")
    record(results, size, seed, sets, metrics, commit, where)


def record(results: Path, size: int, seed: int, sets: list[str], metrics: dict, commit: str, where: dict,
           **extra) -> None:
    """Add one point to the results file (replacing an older run of the same point, ``same_point``), atomically."""
    rec = {"train_utterances": size, "seed": seed, "commit": commit, "sets": sets, **where, **extra,
           "targets": metrics.get("targets"),
           "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    data = load(results)
    data["runs"] = [r for r in data["runs"] if not same_point(r, size, seed, sets, where.get("precision"))]
    data["runs"].append(rec)
    with atomic_path(results) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def same_point(r: dict, size: int, seed: int, sets: list[str], precision: str | None) -> bool:
    """One point is a size, a seed, the extra params and the precision it trained in: the same seed in
    another precision is another measurement (it sits in its own row of the table)."""
    return (r["train_utterances"], r["seed"], r["sets"], r.get("precision")) == (size, seed, sets, precision)


def load(results: Path) -> dict:
    return json.loads(results.read_text()) if results.exists() else {"runs": []}


def shares(m: dict) -> dict[str, float]:
    """Each variant's share of the NLL gap text_only -> speech_frames; and of the rebuilt speech's WER gap."""
    base, top = m["text_only_nll"], m["speech_frames_nll"]
    out = {v: (base - m[f"{p}nll"]) / (base - top) for _, v, p in SERIES if f"{p}nll" in m}
    for _, v, p in SERIES:
        if f"{p}rebuilt_wer_gap_closed" in m:
            out[f"{v} wer"] = m[f"{p}rebuilt_wer_gap_closed"]
    return out


def wer_shares(r: dict) -> dict[str, float]:
    """A run's share of the rebuilt speech's WER gap (%) per headline variant that has one."""
    s = shares(r["metrics"])
    return {v: 100 * s[f"{v} wer"] for v in HEADLINE.values() if f"{v} wer" in s}


def print_runs(runs: list[dict], variants: list[str]) -> None:
    """Every run on a line of its own (markdown): what the table's means and spreads are made of."""
    wer = list(HEADLINE.values())
    print("| train utterances | seed | commit | machine, precision | " + " | ".join(f"{v} (% of NLL gap)" for v in variants)
          + " | " + " / ".join(wer) + " WER gap closed (%) |")
    print("|---|---|---|---|" + "---|" * (len(variants) + 1))
    pct = lambda s, k: f"{100 * s[k]:.1f}" if k in s else ""  # noqa: E731
    for r in sorted(runs, key=lambda r: (r["train_utterances"], str(r.get("precision")), r["seed"])):
        s = shares(r["metrics"])
        print(f"| {r['train_utterances']} | {r['seed']} | {r['commit'][:7]} | {r['machine']}, {r['precision']}"
              + (f" ({' '.join(r['sets'])})" if r["sets"] else "") + " | "
              + " | ".join(pct(s, v) for v in variants) + " | " + " / ".join(pct(s, f"{v} wer") for v in wer) + " |")


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares share = a + b * log10(size) over every (size, share) point; None under two sizes."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [math.log10(x) for x, _ in points], [y for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def crossing(line: tuple[float, float] | None, share: float) -> float | None:
    """The size at which the line reaches ``share``; None if it never rises to it."""
    if line is None or line[1] <= 0:
        return None
    return 10 ** ((share - line[0]) / line[1])


def fmt(xs: list[float]) -> str:
    """Mean ± sd over seeds in %; one seed has no spread to show."""
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def report(data: dict, csv_path: Path, png_path: Path, wer_csv_path: Path | None = None) -> None:
    runs = data["runs"]
    if not runs:
        print("no runs yet")
        return
    sizes = sorted({r["train_utterances"] for r in runs})
    by = {n: [r for r in runs if r["train_utterances"] == n] for n in sizes}
    rows = sorted({(r["train_utterances"], str(r.get("precision")), tuple(r["sets"])) for r in runs})
    variants = [v for _, v, _ in SERIES]
    print(f"targets: {sorted({r['targets'] for r in runs})}")
    print("| train utterances | seeds | commit | machine, precision | "
          + " | ".join(f"{v} (% of NLL gap)" for v in variants) + " | "
          + " | ".join(f"{v} WER gap closed (%)" for v in HEADLINE.values()) + " |")
    print("|---|---|---|---|" + "---|" * (len(variants) + 2))
    for n, precision, sets in rows:  # one row per size, precision and extra params: seeds spread within a row
        row = [r for r in by[n] if str(r.get("precision")) == precision and tuple(r["sets"]) == sets]
        s = [shares(r["metrics"]) for r in row]
        cells = [fmt([x[v] for x in s]) if all(v in x for x in s) else "" for v in variants]
        wer = [fmt([x[f"{v} wer"] for x in s]) if all(f"{v} wer" in x for x in s) else "" for v in HEADLINE.values()]
        where = sorted({f"{r['machine']}, {r['precision']}" + (f" ({' '.join(r['sets'])})" if r["sets"] else "")
                        for r in row})
        print(f"| {n} | {', '.join(str(r['seed']) for r in row)} | {', '.join(sorted({r['commit'][:7] for r in row}))} "
              f"| {'; '.join(where)} | " + " | ".join(cells + wer) + " |")
    print()
    print_runs(runs, variants)
    lines = {c: fit([(r["train_utterances"], shares(r["metrics"])[v]) for r in runs if v in shares(r["metrics"])])
             for c, v in HEADLINE.items()}
    for c, line in lines.items():
        if line:
            print(f"fit {c} ({HEADLINE[c]}): share = {100 * line[0]:.1f} % + {100 * line[1]:.1f} % per tenfold utterances")
    for c, v in HEADLINE.items():  # every run of a size counts once, whatever its precision
        means = [statistics.mean(shares(r["metrics"])[v] for r in by[n]) for n in sizes]
        steps = ", ".join(f"{a:,} -> {b:,} {100 * (y - x):+.1f}" for a, b, x, y in zip(sizes, sizes[1:], means, means[1:]))
        print(f"{c} ({v}), mean of every run of a size: "
              + ", ".join(f"{n:,}: {100 * m:.1f} %" for n, m in zip(sizes, means)) + f"; per step: {steps}")
        if lines[c]:
            on = lines[c][0] + lines[c][1] * math.log10(sizes[-1])
            print(f"{c} at {sizes[-1]:,}: the mean {100 * means[-1]:.1f} %, the line {100 * on:.1f} % "
                  f"({100 * (means[-1] - on):+.1f} points)")
    default_at = {n: statistics.mean(shares(r["metrics"])[HEADLINE["default"]] for r in by[n]) for n in sizes}
    ref = max(sizes)
    marks = {}
    for label, target in ((f"the default's share at {ref} ({100 * default_at[ref]:.1f} %)", default_at[ref]),
                          (f"{100 * GOAL:.0f} %", GOAL)):
        x = crossing(lines["TASTE's design"], target)
        marks[label] = x
        print(f"extrapolation: TASTE's design would reach {label} at "
              + (f"~{x:,.0f} training utterances" if x else "no size (its trend does not rise)"))
    x = crossing(lines["default"], GOAL)
    print(f"extrapolation: the default would reach {100 * GOAL:.0f} % at " + (f"~{x:,.0f} training utterances" if x else "no size"))

    # The CSVs and the PNG are what `dvc plots` and the docs read: a report stopped halfway leaves the old ones.
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_utterances", "seed", *variants])
        for r in sorted(runs, key=lambda r: (r["train_utterances"], r["seed"])):
            s = shares(r["metrics"])
            w.writerow([r["train_utterances"], r["seed"], *(f"{100 * s[v]:.2f}" if v in s else "" for v in variants)])
    wer_csv_path = wer_csv_path or csv_path.with_name(f"{csv_path.stem}_wer.csv")
    with atomic_path(wer_csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_utterances", "seed", *HEADLINE.values()])
        for r in sorted(runs, key=lambda r: (r["train_utterances"], r["seed"])):
            if s := wer_shares(r):
                w.writerow([r["train_utterances"], r["seed"], *(f"{s[v]:.2f}" if v in s else "" for v in HEADLINE.values())])
    plot(runs, lines, marks, png_path)


def plot(runs: list[dict], lines: dict, marks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, wer_ax) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [7, 5]})
    colours = {"default": "tab:blue", "TASTE's design": "tab:orange"}
    sizes = sorted({r["train_utterances"] for r in runs})
    far = max([sizes[-1] * 4] + [x for x in marks.values() if x and x < 1e9])
    for c, v in HEADLINE.items():
        pts = [(r["train_utterances"], 100 * shares(r["metrics"])[v]) for r in runs if v in shares(r["metrics"])]
        ax.scatter(*zip(*pts), color=colours[c], label=f"{c} ({v}), one point per seed", zorder=3)
        if lines[c]:
            a, b = lines[c]
            ax.plot([sizes[0], sizes[-1]], [100 * (a + b * math.log10(x)) for x in (sizes[0], sizes[-1])],
                    color=colours[c])
            # A share cannot pass the topline's: the dotted line stops where the fit reaches 100 %.
            end = min(far, crossing(lines[c], 1.0) or far)
            ax.plot([sizes[-1], end], [100 * (a + b * math.log10(x)) for x in (sizes[-1], end)], color=colours[c],
                    linestyle=":", label=f"{c}: fit, extrapolated")
    ax.axhline(100 * GOAL, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    # The measured sizes as plain numbers; matplotlib's minor labels (3x10^2 ...) run into each other.
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sizes + [x for x in (sizes[-1] * 2, sizes[-1] * 4) if x <= far])
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel("training corpus (utterances, synthesize.train_utterances)")
    ax.set_ylabel("share of the NLL gap text_only → topline (%)")
    ax.set_title("Gap closed against corpus size (dotted: extrapolation)")
    ax.legend(fontsize=8)
    plot_wer(wer_ax, runs, sizes, colours)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


WER_AXIS = (-100.0, 100.0)  # % of the WER gap; a seed beyond it is drawn at the edge (its value in the CSV)


def plot_wer(ax, runs: list[dict], sizes: list[int], colours: dict) -> None:
    """The rebuilt speech's WER gap closed per seed (hollow) and its mean per size (filled, joined)."""
    import matplotlib

    lo, hi = WER_AXIS
    clip = lambda y: min(max(y, lo), hi)  # noqa: E731
    for k, (c, v) in enumerate(HEADLINE.items()):
        by = {}
        for r in runs:
            if v in (s := wer_shares(r)):
                by.setdefault(r["train_utterances"], []).append(s[v])
        if not by:
            continue
        # The two configurations side by side at each size, so their seeds do not hide each other.
        nudge = 1.04 ** (k - 0.5)
        pts = [(n * nudge, y) for n in sorted(by) for y in by[n]]
        ax.scatter([x for x, _ in pts], [clip(y) for _, y in pts], facecolors="none", edgecolors=colours[c],
                   label=f"{c} ({v}), one run", zorder=3)
        means = [(n * nudge, statistics.mean(by[n])) for n in sorted(by)]
        ax.plot([x for x, _ in means], [clip(y) for _, y in means], color=colours[c], marker="o",
                label=f"{c}: mean over the runs")
        # A value off the axis is drawn at its edge and written beside it (a run's below a mean's).
        for what, xy, dy in (("a run", pts, -4), ("mean", means, 6)):
            for x, y in xy:
                if clip(y) != y:
                    ax.annotate(f"{what}: {y:.0f} %", (x, clip(y)), textcoords="offset points",
                                xytext=(8, dy if y < lo else -dy), fontsize=7, color=colours[c], va="center")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_ylim(lo - 10, hi + 10)
    ax.set_xlabel("training corpus (utterances)")
    ax.set_ylabel("share of the rebuilt speech's WER gap (%)")
    ax.set_title(f"Rebuilt speech: WER gap closed\n(16 utterances, no fit; beyond ±{hi:.0f} %: at the edge)",
                 fontsize=10)
    ax.legend(fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[], help="synthesize.train_utterances values")
    ap.add_argument("--seeds", nargs="*", type=int, default=[1337], help="train.seed values")
    ap.add_argument("--set", action="append", default=[], help="another param for every run (key=value) that "
                    "does not change what is computed, e.g. train.device=cuda (the table names it)")
    ap.add_argument("--results", type=Path, default=ROOT / "docs/results/scaling.json")
    ap.add_argument("--csv", type=Path, default=ROOT / "docs/results/scaling.csv")
    ap.add_argument("--wer-csv", type=Path, default=None,
                    help="the WER-gap DVC plot's data (default: beside --csv, its name + _wer)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs/results/scaling.png")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        precision = machine(args.set)["precision"]
        done = {(r["train_utterances"], r["seed"]) for r in load(args.results)["runs"]
                if r["sets"] == args.set and r.get("precision") == precision}
        for size in args.sizes:
            for seed in args.seeds:
                if (size, seed) in done:
                    print(f"scaling: {name(size, seed)} is in {args.results}, skipped")
                    continue
                run(size, seed, args.set, args.results)
    report(load(args.results), args.csv, args.png, args.wer_csv)


if __name__ == "__main__":
    main()
