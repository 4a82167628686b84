"""Stage evaluate: teacher-forced scores of taste, text_only and the shuffled-speech control on the
test split, the trivial baselines, and the plots (PNG plus DVC plot data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, metrics, tables, train
from .tables import atomic_path


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


@torch.no_grad()
def attention(model, ex: data.Example) -> np.ndarray:
    """(text tokens, frames) cross-attention of the aggregator's last layer, mean over heads."""
    attn = model.aggregator.layers[-1].encoder_attn
    attn.keep_weights = True
    device = next(model.parameters()).device
    try:
        b = data.to_device(data.collate([ex]), device)
        mask = torch.ones(1, len(ex.mid), dtype=torch.bool, device=device)
        model.speech_vectors(b["text_emb"], b["mid"], b["last"], mask)
        w = attn.last_weights[0].mean(0)[model.aggregator.num_prefix :]
    finally:
        attn.keep_weights, attn.last_weights = False, None
    return w.float().cpu().numpy()


def run(test_files: dict, train_s3: str, model_dirs: dict[str, str], text_model: str, seed: int,
        batch_size: int, attention_utterances: int, metrics_path: str, plots_dir: str, device: str = "cpu",
        buffer_rows: int = 0) -> dict:
    from . import hardware
    from . import text as text_mod

    device = hardware.resolve_device(device, "train.device")
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    test, meta = data.load_split(**test_files)
    missing = [d for d in model_dirs.values() if not (Path(d) / checkpoint.MODEL_FILE).exists()]
    if missing:
        raise FileNotFoundError(f"no trained model in {missing}: run the train / finetune stages first")
    models = {name: checkpoint.load_checkpoint(d, device) for name, d in model_dirs.items()}
    for name, (model, info) in models.items():
        if info["model_args"]["vocab_size"] != int(meta["vocab_size"]):
            raise ValueError(f"{model_dirs[name]} was trained on {info['model_args']['vocab_size']} units, "
                             f"the test targets have {meta['vocab_size']}")
    preds = {name: train.predict(m, test, batch_size, device, buffer_rows=buffer_rows) for name, (m, _) in models.items()}
    perm = metrics.derangement(len(test), seed)
    preds["shuffled_speech"] = train.predict(models["taste"][0], test, batch_size, device,
                                             speech_from=dict(enumerate(perm)), buffer_rows=buffer_rows)
    train_targets = tables.read_s3(train_s3).column("tokens").to_pylist()
    units = [test.units(i) for i in range(len(test))]
    preds.update(metrics.baseline_preds(units, [np.asarray(t) for t in train_targets]))

    scores = {name: metrics.score(p) for name, p in preds.items()}
    # The topline: the variant that reads every Whisper frame (speech_frames), when one was trained.
    topline = next((n for n, (_, info) in models.items() if info["model_args"]["variant"] == "speech_frames"), None)
    for name in [n for n in models if n not in ("text_only", topline)] + ["shuffled_speech"]:
        scores[name].update(metrics.gap_metrics(scores[name], scores["text_only"],
                                                scores[topline] if topline else None))
    # The headline is taste's, unprefixed; every other variant and the controls get their name as prefix.
    result = {f"{k}": v for k, v in scores["taste"].items()}
    for name in [n for n in models if n != "taste"] + ["shuffled_speech"]:
        result.update({f"{name}_{k}": v for k, v in scores[name].items()})
    for name in ("copy_prev", "most_frequent"):
        result.update({f"{name}_{k}": v for k, v in scores[name].items() if k != "nll"})
    repeats = np.concatenate([u[1:] == u[:-1] for u in units])
    result.update({"targets": meta["targets"], "num_utterances": len(test), "unit_repeat_rate": float(repeats.mean()),
                   "fusion_weight_speech": float(models["taste"][0].fusion_logits.detach().softmax(0)[1]),
                   "best_epoch": {n: info["best"]["epoch"] for n, (_, info) in models.items()}})
    _write_json(Path(metrics_path), result)

    curves = {name: metrics.per_position(preds[name]) for name in [*models, "shuffled_speech", "copy_prev"]}
    _write_json(plots / "per_position.json", metrics.wide(curves, "seconds", "top1_acc"))
    metrics.plot_per_position(curves, plots / "per_position.png")

    histories = {n: info.get("history", []) for n, (_, info) in models.items()}
    _write_json(plots / "loss_curves.json", [dict(r, variant=n) for n, rows in histories.items() for r in rows])
    metrics.plot_losses(histories, plots / "loss_curves.png")

    tokenizer, _ = text_mod.load(text_model)
    att_dir = plots / "attention"
    att_dir.mkdir(exist_ok=True)
    shown = test.examples(range(min(attention_utterances, len(test))))
    # Where timing is lost: targets against the topline's, taste's and text_only's top-1 over time.
    unit_dir = plots / "units"
    unit_dir.mkdir(exist_ok=True)
    order = [n for n in (topline, "taste", "text_only") if n]
    for i, ex in shown.items():
        metrics.plot_units(preds["taste"][i]["target"][:-1], {n: preds[n][i]["pred"][:-1] for n in order},
                           f"{ex.utt_id}: target units and teacher-forced top-1 ({meta['targets']})",
                           unit_dir / f"{ex.utt_id}.png")
    for ex in shown.values():
        w = attention(models["taste"][0], ex)
        tokens = [tokenizer.decode([int(i)]) for i in ex.token_ids]
        metrics.plot_attention(w, tokens, f"{ex.utt_id}: aggregator cross-attention (last layer)",
                               att_dir / f"{ex.utt_id}.png")
    return result
