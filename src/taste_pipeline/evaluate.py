"""Stage evaluate: on the test split, teacher-forced scores of every variant (taste, text_only, the
topline, taste_rvq, ...), the shuffled-speech control and the speaker-embedding leak control, free-running scores (units generated from
text + speech or codes), the bitrate and codebook health of the quantized variants, the trivial
baselines, and the plots (PNG plus DVC plot data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import alignment, checkpoint, data, metrics, rebuild, tables, train
from .tables import atomic_path


def _finite(obj):
    """JSON has no NaN: a score that is undefined (no speech to compare, a gap of zero) is written as null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


@torch.no_grad()
def attention(model, ex: data.Example) -> np.ndarray:
    """(text tokens, frames): where each text token reads in the aggregator (its value layer, mean over heads)."""
    device = next(model.parameters()).device
    return model.speech.frame_attention(data.to_device(data.collate([ex]), device))[0].float().cpu().numpy()


def spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)`` (every voice of a speaker-sorted split), all if k >= n."""
    return list(range(n)) if k >= n else sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


@torch.no_grad()
def generate_all(model, test, batch_size: int, device: str = "cpu", buffer_rows: int = 0, top_k: int | None = None,
                 seed: int = 0) -> list[tuple[np.ndarray, bool]]:
    """Free-running units for each test utterance (in its order) and whether it hit the cap (the model's
    ``unit_cap`` of its text length, never its reference length): sampled from the ``top_k`` likeliest
    with a generator seeded with ``seed`` (greedy when None)."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for group, batch in data.fixed_batches(test, batch_size, buffer_rows, device):
        caps = model.cfg.unit_cap(batch["text_len"]).tolist()
        for i, units, cap in zip(group, model.generate(batch, top_k=top_k, generator=g), caps):
            out[i] = (units.cpu().numpy(), len(units) >= cap)
    return [out[i] for i in data.as_subset(test).indices]


@torch.no_grad()
def encode_all(model, test, batch_size: int, device: str = "cpu", buffer_rows: int = 0) -> np.ndarray:
    """taste_rvq: the codes of every text token of the test split, (tokens, levels)."""
    model.eval()
    codes = []
    for _, batch in data.fixed_batches(test, batch_size, buffer_rows, device):
        real = torch.arange(batch["text_emb"].shape[1], device=device)[None] < batch["text_len"][:, None]
        codes.append(model.encode(batch)[real].cpu().numpy())
    return np.concatenate(codes)


@torch.no_grad()
def alignment_scores(model, test, words_path: str, tokenizer, batch_size: int, device: str = "cpu",
                     buffer_rows: int = 0) -> dict:
    """The aggregator's alignment (the frame -> text token its value layer puts there) against the true word
    timings of ``words_path`` (the synthesize stage's), over the test utterances that table has, and the
    same scores for tokens spread evenly (``alignment``). An utterance whose tokens do not make up its
    table's words is counted in ``align_skipped``."""
    t = tables.read_words(words_path)
    timing = {u: (w, np.asarray(s), np.asarray(e))
              for u, w, s, e in zip(*(t.column(c).to_pylist() for c in ("utt_id", "words", "start", "end")))}
    subset = data.Subset(test, [i for i, u in enumerate(test.utt_ids) if u in timing])
    out = {"align_utterances": len(subset.indices)}
    if not subset.indices:
        return out
    model.eval()
    attended, uniform, skipped = [], [], 0
    for group, batch in data.fixed_batches(subset, batch_size, buffer_rows, device):
        weights = model.speech.frame_attention(batch).float()
        for j, i in enumerate(group):
            words, starts, ends = timing[test.utt_ids[i]]
            tok_word = alignment.token_words([tokenizer.decode([int(k)]) for k in test.token_ids(i)])
            if tok_word[-1] + 1 != len(words):
                skipped += 1
                continue
            L, F = int(batch["text_len"][j]), int(batch["frame_len"][j])
            attended.append(alignment.score(weights[j, :L, :F].argmax(0).cpu().numpy(), tok_word, starts, ends))
            uniform.append(alignment.score(alignment.uniform_tokens(L, F), tok_word, starts, ends))
    return {**out, "align_skipped": skipped, **alignment.summarize(attended, "align_"),
            **alignment.summarize(uniform, "align_uniform_")}


def quantizer_metrics(model, test, batch_size: int, device: str, buffer_rows: int, tokens_per_s: float,
                      train_codes: str | None = None) -> dict:
    """Bitrate and codebook health of a quantized variant: bits per token and per second of test audio,
    per-level usage and perplexity of its codes on the test split, and with ``train_codes`` (the
    tokenize table of the train split) the share of each level's codes never used on all of train."""
    levels, size = model.squeeze.levels, model.squeeze.codebook_size
    out = {"bits_per_token": model.bits_per_token, "bitrate_bps": tokens_per_s * model.bits_per_token}
    codes = encode_all(model, test, batch_size, device, buffer_rows)
    out.update(metrics.codebook_stats(codes[:, :levels], size, "codebook_"))
    if codes.shape[1] > levels:
        # What the 8-bit duration code would cost entropy-coded (its empirical entropy on the test split).
        p = np.bincount(codes[:, -1]) / len(codes)
        out["duration_entropy_bits"] = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    if train_codes:
        t = tables.read_codes(train_codes)
        codes = np.concatenate([tables.row_matrix(t, "codes", i) for i in range(t.num_rows)])[:, :levels]
        dead = [float(np.mean(np.bincount(codes[:, k], minlength=size) == 0))
                for k in range(codes.shape[1])]
        out.update({f"dead_codes_l{k + 1}": d for k, d in enumerate(dead)})
        out["dead_code_share"] = float(np.mean(dead))
    return out


def run(test_files: dict, train_s3: str, model_dirs: dict[str, str], text_model: str, seed: int,
        batch_size: int, attention_utterances: int, metrics_path: str, plots_dir: str, device: str = "cpu",
        buffer_rows: int = 0, train_codes: dict[str, str] | None = None, free_utterances: int = 64,
        free_top_k: int | None = 25, words_path: str | None = None, rebuild_args: dict | None = None,
        listen_dir: str | None = None, units_path: str | None = None) -> dict:
    """``train_codes``: variant -> its tokenize table of the train split (dead codes). Free-running
    scores are over ``free_utterances`` test utterances spread over the split, sampled with
    ``free_top_k`` (greedy decoding of 50 Hz units loops on a repeated unit and never ends). With
    ``words_path`` (true word timings) the headline's alignment is scored (``alignment_scores``). With
    ``rebuild_args`` (``vocoder_dir``, ``griffin_lim_iters``, ``asr_model``, ``utterances``, ``listen``)
    the first ``utterances`` of the free-running set are rebuilt as speech and scored (``rebuild.run``),
    the first ``listen`` of them written to ``listen_dir`` (default: ``plots_dir``/listen). With
    ``units_path`` the free-running units of every variant and the true units of the same utterances
    are written there (``tables.FREE_UNITS``), for rebuilding them with another vocoder."""
    from . import hardware
    from . import text as text_mod

    device = hardware.resolve_device(device, "train.device")
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    # With word timings, the test split also carries true durations (variants with unit_alignment oracle).
    test, meta = data.load_split(**test_files, words_path=words_path)
    missing = [d for d in model_dirs.values() if not (Path(d) / checkpoint.MODEL_FILE).exists()]
    if missing:
        raise FileNotFoundError(f"no trained model in {missing}: run the train / finetune stages first")
    models = {name: checkpoint.load_checkpoint(d, device) for name, d in model_dirs.items()}
    for name, (model, info) in models.items():
        if info["model_args"]["vocab_size"] != int(meta["vocab_size"]):
            raise ValueError(f"{model_dirs[name]} was trained on {info['model_args']['vocab_size']} units, "
                             f"the test targets have {meta['vocab_size']}")
    # Roles come from the parts: the baseline reads no speech (nor true durations), the headline one vector
    # per text token (the first of each, in train.variants order), the topline every Whisper frame (if
    # one was trained).
    role = lambda speech, *align: next((n for n, (m, _) in models.items() if m.cfg.speech == speech  # noqa: E731
                                        and (not align or m.cfg.unit_alignment in align)), None)
    baseline, headline, topline = role("none", "none"), role("tokens"), role("frames")
    if baseline is None or headline is None:
        raise ValueError(f"evaluate needs a variant with speech: none and one with speech: tokens; got "
                         f"{ {n: m.cfg.speech for n, (m, _) in models.items()} }")
    preds = {name: train.predict(m, test, batch_size, device, buffer_rows=buffer_rows) for name, (m, _) in models.items()}
    perm = metrics.derangement(len(test), seed)
    preds["shuffled_speech"] = train.predict(models[headline][0], test, batch_size, device,
                                             speech_from=dict(enumerate(perm)), buffer_rows=buffer_rows)
    # The leak control: each utterance decoded with the embedding of another utterance of its speaker. An
    # embedding that says who speaks scores the same; one that says what or when was said scores worse.
    other = data.same_speaker_other_utterance(test.speaker_ids)
    swap_nll = {name: train.summarize(train.predict(m, test, batch_size, device, buffer_rows=buffer_rows,
                                                    speaker_from=other))["nll"]
                for name, (m, _) in models.items() if m.cfg.speaker != "none"}
    train_targets = tables.read_s3(train_s3).column("tokens").to_pylist()
    units = [test.units(i) for i in range(len(test))]
    preds.update(metrics.baseline_preds(units, [np.asarray(t) for t in train_targets]))

    scores = {name: metrics.score(p) for name, p in preds.items()}
    durations = tables.read_manifest(test_files["manifest_path"]).column("duration").to_numpy()
    tokens_per_s = sum(test.num_text_tokens(i) for i in range(len(test))) / float(np.sum(durations))
    free = data.Subset(test, spread(len(test), free_utterances))
    generated = {}
    for name, (model, _) in models.items():
        gen = generate_all(model, free, batch_size, device, buffer_rows, free_top_k, seed)
        generated[name] = [g for g, _ in gen]
        scores[name].update({f"free_{k}": v for k, v in metrics.free_running(
            [g for g, _ in gen], [test.units(i) for i in free.indices], [c for _, c in gen]).items()})
        if model.squeeze is not None and model.squeeze.levels:
            scores[name].update(quantizer_metrics(model, test, batch_size, device, buffer_rows, tokens_per_s,
                                                  (train_codes or {}).get(name)))
    if units_path:
        sources = {"true_units": [test.units(i) for i in free.indices], **generated}
        rows = [(test.utt_ids[i], name, np.asarray(u, np.int32)) for name, units in sources.items()
                for i, u in zip(free.indices, units)]
        table = pa.Table.from_pydict({"utt_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                                      "units": [r[2] for r in rows]}, schema=tables.FREE_UNITS)
        table = table.replace_schema_metadata({"targets": meta["targets"], "free_top_k": str(free_top_k),
                                               "seed": str(seed), "test_manifest": str(test_files["manifest_path"])})
        tables.validate_free_units(table, str(units_path))
        tables.write_table(units_path, table, tables.FREE_UNITS, table.schema.metadata)
    rebuilt = {}
    if rebuild_args:
        a = rebuild_args
        picked = spread(len(free.indices), a["utterances"])
        rebuilt, _ = rebuild.run(test, [free.indices[k] for k in picked],
                                 {n: [g[k] for k in picked] for n, g in generated.items()},
                                 test_files["manifest_path"], a["vocoder_dir"], a["griffin_lim_iters"], a["asr_model"],
                                 a["listen"], listen_dir or plots / "listen", a.get("asr_window_s", 30))
        for name in models:
            scores[name].update({f"rebuilt_{k}": v for k, v in rebuilt[name].items()})
    for name in [n for n in models if n not in (baseline, topline)] + ["shuffled_speech"]:
        scores[name].update(metrics.gap_metrics(scores[name], scores[baseline], scores[topline] if topline else None))
    for name in [n for n in models if n != baseline] if rebuilt else []:
        # Share of the WER gap between text alone and the vocoder's ceiling (the true units) closed.
        span = rebuilt[baseline]["wer"] - rebuilt["true_units"]["wer"]
        scores[name]["rebuilt_wer_gap_closed"] = (rebuilt[baseline]["wer"] - rebuilt[name]["wer"]) / span if span else float("nan")
    for name, nll in swap_nll.items():
        scores[name].update({"speaker_swap_nll": nll, "speaker_swap_delta_nll": nll - scores[name]["nll"]})
    # The headline is unprefixed; every other variant and the controls get their name as prefix.
    result = {f"{k}": v for k, v in scores[headline].items()}
    for name in [n for n in models if n != headline] + ["shuffled_speech"]:
        result.update({f"{name}_{k}": v for k, v in scores[name].items()})
    for name in ("copy_prev", "most_frequent"):
        result.update({f"{name}_{k}": v for k, v in scores[name].items() if k != "nll"})
    if rebuilt:
        # The vocoder's ceiling (true units) and the transcriber's floor (the original audio).
        result.update({f"true_units_rebuilt_{k}": v for k, v in rebuilt["true_units"].items()})
        result["original_wer"] = rebuilt["original"]["wer"]
        result["rebuilt_utterances"] = min(len(free.indices), rebuild_args["utterances"])
    repeats = np.concatenate([u[1:] == u[:-1] for u in units])
    result.update({"targets": meta["targets"], "num_utterances": len(test), "unit_repeat_rate": float(repeats.mean()),
                   "text_tokens_per_s": tokens_per_s, "free_utterances": len(free.indices),
                   "fusion_weight_speech": float(models[headline][0].speech.fusion_logits.detach().softmax(0)[1]),
                   "best_epoch": {n: info["best"]["epoch"] for n, (_, info) in models.items()}})
    tokenizer, _ = text_mod.load(text_model)
    if words_path:
        result.update(alignment_scores(models[headline][0], test, words_path, tokenizer, batch_size, device,
                                       buffer_rows))
    _write_json(Path(metrics_path), result)

    curves = {name: metrics.per_position(preds[name]) for name in [*models, "shuffled_speech", "copy_prev"]}
    _write_json(plots / "per_position.json", metrics.wide(curves, "seconds", "top1_acc"))
    metrics.plot_per_position(curves, plots / "per_position.png")

    histories = {n: info.get("history", []) for n, (_, info) in models.items()}
    _write_json(plots / "loss_curves.json", [dict(r, variant=n) for n, rows in histories.items() for r in rows])
    metrics.plot_losses(histories, plots / "loss_curves.png")

    att_dir = plots / "attention"
    att_dir.mkdir(exist_ok=True)
    shown = test.examples(range(min(attention_utterances, len(test))))
    # Where timing is lost: targets against the topline's, the headline's and the baseline's top-1 over time.
    unit_dir = plots / "units"
    unit_dir.mkdir(exist_ok=True)
    order = [n for n in (topline, headline, baseline) if n]
    for i, ex in shown.items():
        metrics.plot_units(preds[headline][i]["target"][:-1], {n: preds[n][i]["pred"][:-1] for n in order},
                           f"{ex.utt_id}: target units and teacher-forced top-1 ({meta['targets']})",
                           unit_dir / f"{ex.utt_id}.png")
    for ex in shown.values():
        w = attention(models[headline][0], ex)
        tokens = [tokenizer.decode([int(i)]) for i in ex.token_ids]
        metrics.plot_attention(w, tokens, f"{ex.utt_id}: aggregator cross-attention (last layer)",
                               att_dir / f"{ex.utt_id}.png")
    return result
