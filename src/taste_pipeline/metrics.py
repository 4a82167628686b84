"""Evaluation metrics (teacher-forced and free-running), codebook health, trivial baselines and the
plots people look at.

Units at 50 Hz repeat a lot, so "copy the previous unit" already scores well on overall top-1.
``change_top1_acc`` scores only positions whose target differs from the previous target: that is
where timing and voice information shows. All metrics are over unit positions (END excluded).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

POSITION_BIN = 25  # units per bin of the per-position plot: 0.5 s at 50 Hz


def _units(p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return p["pred"][:-1], p["target"][:-1], p["nll"][:-1]


def score(preds: list[dict]) -> dict:
    """top1_acc, change_top1_acc, nll, first_token_acc over a list of ``train.predict`` outputs."""
    hits, change_hits, nlls, first = [], [], [], []
    for p in preds:
        pred, target, nll = _units(p)
        hit = pred == target
        hits.append(hit)
        nlls.append(nll)
        change = np.zeros_like(hit)
        change[1:] = target[1:] != target[:-1]
        change_hits.append(hit[change])
        first.append(hit[:1])
    cat = np.concatenate
    return {"top1_acc": float(cat(hits).mean()), "change_top1_acc": float(cat(change_hits).mean()),
            "nll": float(cat(nlls).mean()), "first_token_acc": float(cat(first).mean())}


UNIT_RATE_HZ = 50


def gap_metrics(v: dict, text_only: dict, topline: dict | None) -> dict:
    """How much of what speech can add a variant gets, from ``score`` dicts.

    ``speech_bits_per_s``: what the variant knows about the targets beyond text alone, (NLL_text_only -
    NLL_v) nats per unit x 50 units/s / ln 2. ``gap_closed_*``: the share of the gap between text_only
    and the full-speech topline (speech_frames) that the variant closes, for NLL, top-1 and change
    top-1 (1 = as good as the topline, 0 = no better than text alone, < 0 = worse).
    """
    out = {"speech_bits_per_s": (text_only["nll"] - v["nll"]) * UNIT_RATE_HZ / np.log(2)}
    if topline is not None:
        for k in ("nll", "top1_acc", "change_top1_acc"):
            gap = topline[k] - text_only[k]
            out[f"gap_closed_{k}"] = (v[k] - text_only[k]) / gap if gap else float("nan")
    return out


def free_running(generated: list[np.ndarray], targets: list[np.ndarray], capped: list[bool]) -> dict:
    """Units generated from text (+ speech or codes) against the targets, no teacher forcing.

    ``uer``: unit error rate, edit distance (jiwer, each unit a word) / target units, over the split.
    ``length_error``: mean |generated - target| / target units per utterance (duration, 20 ms a unit);
    ``length_ratio``: mean generated / target. ``no_end``: share of utterances stopped at the cap
    before END (their length error is a floor).
    """
    import jiwer

    words = lambda u: " ".join(f"u{int(x)}" for x in u)  # noqa: E731
    out = jiwer.process_words([words(t) for t in targets], [words(g) for g in generated])
    n_ref = sum(len(t) for t in targets)
    errors = out.substitutions + out.deletions + out.insertions
    ratio = np.array([len(g) / len(t) for g, t in zip(generated, targets)])
    return {"uer": errors / n_ref, "length_error": float(np.mean(np.abs(ratio - 1))),
            "length_ratio": float(np.mean(ratio)), "no_end": float(np.mean(capped))}


def codebook_stats(codes: np.ndarray, codebook_size: int, prefix: str = "") -> dict:
    """Per residual-VQ level of ``codes`` (tokens, levels): share of the codebook used at least once, and
    the perplexity of the code distribution (exp of its entropy; codebook_size = all used equally)."""
    out = {}
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out[f"{prefix}usage_l{level + 1}"] = float(np.mean(counts > 0))
        out[f"{prefix}perplexity_l{level + 1}"] = float(np.exp(-(p * np.log(p)).sum()))
    return out


def baseline_preds(targets: list[np.ndarray], train_targets: list[np.ndarray]) -> dict[str, list[dict]]:
    """copy_prev (most frequent train unit at the first position) and most_frequent, as ``predict`` outputs."""
    mode = Counter(np.concatenate(train_targets).tolist()).most_common(1)[0][0]
    out = {"copy_prev": [], "most_frequent": []}
    for t in targets:
        end = np.array([-1])  # END slot, excluded by score()
        copy = np.concatenate([[mode], t[:-1]])
        out["copy_prev"].append({"pred": np.concatenate([copy, end]), "target": np.concatenate([t, end]),
                                 "nll": np.full(len(t) + 1, np.nan)})
        out["most_frequent"].append({"pred": np.concatenate([np.full(len(t), mode), end]),
                                     "target": np.concatenate([t, end]), "nll": np.full(len(t) + 1, np.nan)})
    return out


def per_position(preds: list[dict], bin_size: int = POSITION_BIN) -> list[dict]:
    """Top-1 by position in the unit sequence, in bins of ``bin_size`` units."""
    hits: dict[int, list[bool]] = {}
    for p in preds:
        pred, target, _ = _units(p)
        for b, h in zip(np.arange(len(target)) // bin_size, pred == target):
            hits.setdefault(int(b), []).append(bool(h))
    return [{"seconds": b * bin_size / 50.0, "top1_acc": float(np.mean(h)), "count": len(h)}
            for b, h in sorted(hits.items()) if len(h) >= 20]


def wide(curves: dict[str, list[dict]], x: str, y: str) -> list[dict]:
    """One row per ``x`` with each system's ``y`` as a column (null where it has no value): DVC draws
    one series per column it is given, but cannot split one column by a label."""
    rows: dict[float, dict] = {}
    for name, curve in curves.items():
        for r in curve:
            rows.setdefault(r[x], {x: r[x], **{n: None for n in curves}})[name] = r[y]
    return [rows[k] for k in sorted(rows)]


def derangement(n: int, seed: int) -> list[int]:
    """A permutation without fixed points: every utterance gets another one's speech."""
    if n < 2:
        raise ValueError("the shuffled-speech control needs at least 2 test utterances")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm.tolist()


# ---------------------------------------------------------------------------------------------
# Plots (PNG; the same numbers go to DVC plot files by the evaluate stage)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_plot(path, xlabel: str, ylabel: str, title: str, draw) -> None:
    """One 7x4 line chart with grid and legend; ``draw(ax)`` adds the lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_position(curves: dict[str, list[dict]], path) -> None:
    def draw(ax):
        for name, rows in curves.items():
            ax.plot([r["seconds"] for r in rows], [r["top1_acc"] for r in rows], marker=".", label=name)

    _line_plot(path, "position in the utterance (s)", "top-1 accuracy (teacher-forced)",
               "Accuracy by position, test split", draw)


def plot_losses(histories: dict[str, list[dict]], path) -> None:
    def draw(ax):
        for name, rows in histories.items():
            epochs = [r["epoch"] + 1 for r in rows]
            line, = ax.plot(epochs, [r["train_loss"] for r in rows], label=f"{name} train")
            ax.plot(epochs, [r["val_nll"] for r in rows], "--", color=line.get_color(), label=f"{name} validation")

    _line_plot(path, "epoch", "cross-entropy per unit (nats)", "Training and speaker-disjoint validation loss", draw)


def plot_attention(weights: np.ndarray, tokens: list[str], title: str, path) -> None:
    """weights: (text tokens, frames) from the aggregator's cross-attention."""
    plt = _plt()
    L, F = weights.shape
    fig, ax = plt.subplots(figsize=(max(6, F / 40), max(3, L / 4)))
    ax.imshow(weights, aspect="auto", origin="upper", cmap="magma", interpolation="nearest",
              extent=(0, F / 50.0, L - 0.5, -0.5))
    ax.set_yticks(range(L))
    ax.set_yticklabels(tokens, fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_units(target: np.ndarray, preds: dict[str, np.ndarray], title: str, path) -> None:
    """The target units against each system's teacher-forced top-1 over time: one row of unit ids each
    (colour = unit id, so a run of one colour is a held unit), and below, per system, where it was right
    (dark) or wrong (light) — where timing is lost shows as light bands around unit changes."""
    plt = _plt()
    T = len(target)
    names = list(preds)
    seconds = T / UNIT_RATE_HZ
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, seconds * 1.4), 1.2 + 0.45 * (2 * len(names) + 1)),
                                      sharex=True, gridspec_kw={"height_ratios": [len(names) + 1, len(names)]})
    ids = np.stack([target] + [preds[n][:T] for n in names])
    top.imshow(ids, aspect="auto", interpolation="nearest", cmap="nipy_spectral", extent=(0, seconds, len(ids) - 0.5, -0.5))
    top.set_yticks(range(len(ids)))
    top.set_yticklabels(["target"] + names, fontsize=8)
    hits = np.stack([preds[n][:T] == target for n in names]).astype(float)
    bottom.imshow(hits, aspect="auto", interpolation="nearest", cmap="Greys", vmin=-0.3, vmax=1,
                  extent=(0, seconds, len(names) - 0.5, -0.5))
    bottom.set_yticks(range(len(names)))
    bottom.set_yticklabels([f"{n} {hits[i].mean():.2f}" for i, n in enumerate(names)], fontsize=8)
    changes = np.flatnonzero(np.diff(target)) + 1
    for c in changes:  # where the target unit changes
        bottom.axvline(c / UNIT_RATE_HZ, color="tab:red", lw=0.3, alpha=0.5)
    bottom.set_xlabel("seconds (red: target unit changes; dark: right)")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
