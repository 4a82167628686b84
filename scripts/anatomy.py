"""The anatomy of the gap between text alone and the Whisper frames: how much is the voice, how much is
timing, how much is left for text-rate tokens. One `dvc exp run` per seed trains the default variants
plus those below (all in one evaluate, so every row shares the test split and the controls), then a
table of test NLL (mean ± sd over seeds) and shares of the gap.

    python scripts/anatomy.py 1 2 1337           # run one experiment per seed, then report
    python scripts/anatomy.py --report-only      # report experiments named anatomy-seed-*
    python scripts/anatomy.py 1337 --set s3.source=standin:kmeans --prefix anatomy-logmel-
                                                 # the same on the other kind of stand-in targets
    python scripts/anatomy.py --report-only --all-commits --recorded docs/results/anatomy-recorded.json
                                                 # with seeds whose experiments are gone

Rows (every decoder told the speaker unless the row says not; the default's text_only, taste, taste_rvq
and speech_frames are the baseline, the tokens with their coded durations, their tokenizer and the topline):
- text_only_nospk: text alone, no speaker embedding
- text_oracle_nospk: text alone laid on the unit clock by the true token durations (the synthesizer's
  word timings, ``unit_alignment: oracle``), no speaker embedding
- text_oracle: the same with the speaker embedding (voice and timing)
- taste_plain, taste_plain_rvq: TASTE's design, the decoder finding its place in the text itself
  (``unit_alignment: none``)
"""

import argparse
import json
import statistics
import subprocess

EXTRA = {
    "train.variants.text_only_nospk": "{speech: none, speaker: none}",
    "train.variants.text_oracle_nospk": "{speech: none, unit_alignment: oracle, speaker: none}",
    "train.variants.text_oracle": "{speech: none, unit_alignment: oracle}",
    "train.variants.taste_plain": "{speech: tokens, unit_alignment: none}",
    "train.finetune.taste_plain_rvq": "{squeeze: rvq, init: taste_plain, lr: 0.0005, epochs: 4, warmup_steps: 50, "
                                      "unit_alignment: none}",
}
# (row label, eval.json prefix: "" is the headline, taste)
ROWS = [("text alone, no speaker", "text_only_nospk_"), ("text + speaker (the baseline)", "text_only_"),
        ("text + true durations, no speaker", "text_oracle_nospk_"), ("text + speaker + true durations", "text_oracle_"),
        ("taste, TASTE's design (speaker)", "taste_plain_"), ("taste_rvq, TASTE's design (speaker)", "taste_plain_rvq_"),
        ("taste + durations (speaker; the default)", ""), ("taste_rvq + durations (speaker; the default)", "taste_rvq_"),
        ("topline: Whisper frames (speaker)", "speech_frames_")]
PREFIX = "anatomy-seed-"


def run(seed: int, prefix: str, more: list[str]) -> None:
    sets = [x for k, v in EXTRA.items() for x in ("-S", f"+{k}={v}")] + [x for m in more for x in ("-S", m)]
    subprocess.run(["dvc", "exp", "run", "--temp", *sets, "-S", f"train.seed={seed}", "--name", f"{prefix}{seed}"],
                   check=True)


def experiments(prefix: str, all_commits: bool = False) -> dict[int, dict]:
    cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    runs = {}
    for rev in out:
        for exp in rev.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue  # still running, queued or failed: it shows the workspace's metrics
            for e in exp.get("revs", []):
                name = e.get("name") or ""
                if not name.startswith(prefix) or not name[len(prefix):].isdigit():
                    continue
                data = e.get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data") or {}
                missing = [f"{p}nll" for _, p in ROWS if f"{p}nll" not in metrics]
                if metrics and missing:  # made with other rows (an older layout of this script)
                    print(f"skipping {name}: no {missing}")
                elif metrics:
                    runs.setdefault(int(name[len(prefix):]), {**metrics, "rev": data.get("rev", "")})
    return runs


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def report(runs: dict[int, dict], prefix: str) -> None:
    seeds = sorted(runs)
    if not seeds:
        print(f"no experiments named {prefix}*")
        return
    nll = {label: [runs[s][f"{p}nll"] for s in seeds] for label, p in ROWS if all(f"{p}nll" in runs[s] for s in seeds)}
    base, top = nll["text + speaker (the baseline)"], nll["topline: Whisper frames (speaker)"]
    full = nll["text alone, no speaker"]
    print(f"seeds {seeds}; targets {runs[seeds[0]].get('targets')}; experiments {[runs[s]['rev'][:7] for s in seeds]}")
    print("| row | test NLL (nats/unit) | share of the gap text+speaker -> topline | bits/s |")
    print("|---|---|---|---|")
    for label, p in ROWS:
        if label not in nll:
            continue
        share = [(b - x) / (b - t) for x, b, t in zip(nll[label], base, top)]
        bps = runs[seeds[0]].get(f"{p}bitrate_bps")
        print(f"| {label} | {fmt(nll[label])} | {100 * statistics.mean(share):.1f} % ± "
              f"{100 * (statistics.stdev(share) if len(share) > 1 else 0):.1f} | {'' if bps is None else round(bps)} |")
    voice = [(f - b) / (f - t) for f, b, t in zip(full, base, top)]
    print(f"voice: the speaker embedding takes {100 * statistics.mean(voice):.1f} % of the gap text alone -> topline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seeds", nargs="*", type=int)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--prefix", default=PREFIX, help="experiment names: <prefix><seed>")
    ap.add_argument("--set", action="append", default=[], help="another param for every run (key=value)")
    ap.add_argument("--all-commits", action="store_true", help="also experiments based on earlier commits (only "
                    "when no dependency of the pipeline changed since: `git diff A B -- dvc.yaml params.yaml stages src`)")
    ap.add_argument("--recorded", help="JSON of seeds run before whose experiments are gone ({seed: {metric: "
                    "value, ...}}, as eval.json names them); an experiment of the same seed wins")
    args = ap.parse_args()
    if not args.report_only:
        for s in args.seeds:
            run(s, args.prefix, args.set)
    runs = experiments(args.prefix, args.all_commits)
    if args.recorded:
        with open(args.recorded) as f:
            for seed, metrics in json.load(f)["seeds"].items():
                runs.setdefault(int(seed), {"rev": metrics.get("commit", "recorded"), **metrics})
    report(runs, args.prefix)


if __name__ == "__main__":
    main()
