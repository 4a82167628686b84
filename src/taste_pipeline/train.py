"""The training loop, nanoGPT-shaped: model, optimizer, ``predict``/``summarize`` for evaluation,
``lr_at``, then ``fit``: set lr -> step -> log -> periodic resume state -> validate and keep the best.

The loop keeps the checkpoint with the best validation NLL on a speaker-disjoint validation split
carved from train: small models overfit this corpus fast, and overall accuracy is dominated by
copying the previous unit, so it is too noisy to stop on. Data joining and batching live in
``data``; checkpoints and the resume state in ``checkpoint``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import hardware
from .checkpoint import Progress, Resume, fingerprint, save_checkpoint, save_history
from .data import (Example, Loader, Subset, as_subset, batches, collate, fixed_batches, load_split, max_units_per_token,
                   speaker_split, to_device)
from .model import ModelConfig, TasteModel
from .train_params import Train
from .ranks import Ranks


def autocast(device: str, amp: bool | str):
    """Autocast for ``train.amp`` (``auto`` resolved here for ``device``; float32 = off)."""
    dtype = hardware.resolve_amp(amp, device)
    return torch.autocast(device.split(":")[0], dtype=hardware.DTYPES[dtype], enabled=dtype != "float32")


@torch.no_grad()
def predict(model: TasteModel, data, batch_size: int, device: str = "cpu", speech_from: dict[int, int] | None = None,
            amp: bool | str = False, buffer_rows: int = 0, speaker_from: dict[int, int] | None = None) -> list[dict]:
    """Teacher-forced predictions per utterance of ``data`` (a Subset, a Split or a list of Examples), in
    its order: argmax, per-position NLL, targets (units + END). ``speech_from``: index -> the index whose
    Whisper states the item gets instead of its own (the shuffled-speech control); ``speaker_from`` likewise
    its speaker embedding (the leak control: another utterance of the same speaker)."""
    model.eval()
    data = as_subset(data)
    out: dict[int, dict] = {}
    for window in batches(data, batch_size, buffer_rows=buffer_rows):
        need = [i for group in window for i in group]
        other = [m[i] for m in (speech_from, speaker_from) if m for i in need]
        ex = data.source.examples(need + other)
        for group in window:
            batch = collate([ex[i] for i in group], [ex[speech_from[i]] for i in group] if speech_from else None,
                            [ex[speaker_from[i]] for i in group] if speaker_from else None)
            batch = to_device(batch, device)
            with autocast(device, amp):
                logits, _ = model(batch)
            targets = model.targets(batch)
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
            for j, i in enumerate(group):
                n = int(batch["unit_len"][j]) + 1
                out[i] = {"pred": logits[j, :n].argmax(-1).cpu().numpy(), "nll": nll[j, :n].cpu().numpy(),
                          "target": targets[j, :n].cpu().numpy()}
    return [out[i] for i in data.indices]


def summarize(preds: list[dict]) -> dict:
    """NLL per target unit and top-1 over every unit position (END excluded)."""
    nll = np.concatenate([p["nll"][:-1] for p in preds])
    hit = np.concatenate([p["pred"][:-1] == p["target"][:-1] for p in preds])
    return {"nll": float(nll.mean()), "top1_acc": float(hit.mean())}


def codebook_sample(data, tokens: int, seed: int):
    """Utterances of ``data`` drawn at random (seeded) until they hold ``tokens`` text tokens: a sample of
    the whole split for the codebooks' k-means, not its shortest utterances (batches are length-sorted)."""
    data = as_subset(data)
    order = list(data.indices)
    random.Random(seed).shuffle(order)
    chosen, n = [], 0
    for i in order:
        if n >= tokens:
            break
        chosen.append(i)
        n += data.source.num_text_tokens(i)
    return Subset(data.source, sorted(chosen))


@torch.no_grad()
def init_codebooks(model: TasteModel, data, cfg: Train, per_code: int = 8) -> int:
    """squeeze rvq: k-means-initialise the codebooks on the speech vectors of ``per_code`` x codebook size
    text tokens of utterances drawn at random from ``data`` (``codebook_sample``); returns how many."""
    squeeze = model.squeeze
    want = per_code * squeeze.codebook_size
    model.eval()
    got: list[torch.Tensor] = []
    for _, batch in fixed_batches(codebook_sample(data, want, cfg.seed), cfg.batch_size, cfg.buffer_rows, cfg.device):
        mask = torch.arange(batch["text_emb"].shape[1], device=cfg.device)[None] < batch["text_len"][:, None]
        with autocast(cfg.device, cfg.amp):
            vectors = model.speech.vectors(batch)
        got.append(vectors[mask].float())
    vectors = torch.cat(got)
    keep = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(cfg.seed))[:want]
    squeeze.init_codebooks(vectors[keep.sort().values.to(vectors.device)])
    return len(keep)


def planned_steps(train_ex, cfg: Train) -> int:
    """The optimizer steps of ``cfg.epochs`` epochs, for the schedule: each epoch's batch plan drawn as
    ``fit`` draws it, from a fresh ``train.seed`` generator. Windowed batching (``buffer_rows`` smaller
    than the split) cuts a short batch at every window's end, so this is more than ceil(N / batch) x epochs."""
    rng = random.Random(cfg.seed)
    return sum(sum(len(window) for window in batches(train_ex, cfg.batch_size, rng, cfg.buffer_rows))
               for _ in range(cfg.epochs))


def lr_at(step: int, total: int, cfg: Train) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def configure_optimizer(model: TasteModel, cfg: Train) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, the fusion weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98))


def train_step(net, opt, scaler, mine: list[Example], weight: float, cfg: Train, ranks: Ranks) -> tuple[float, int]:
    """One optimizer step on one global batch, of which this rank holds ``mine`` (``Loader.share``);
    returns the batch's mean loss and its number of target tokens.

    DDP averages gradients over ranks, so each rank's mean loss is scaled by (its target tokens x world
    / the batch's target tokens): the averaged gradient is then that of the whole batch's token mean,
    the step a single process would take.
    """
    batch = to_device(collate(mine), cfg.device)
    with autocast(cfg.device, cfg.amp):
        _, losses = net(batch)
    loss = losses["loss"]
    n_local = (batch["unit_len"] + 1).sum().float() * weight  # units + END per item
    if ranks.world > 1:
        stats = torch.stack([n_local, loss.detach().float() * n_local])
        if torch.distributed.get_backend() != "nccl":
            stats = stats.cpu()
        torch.distributed.all_reduce(stats)
        n_total, loss_sum = stats.tolist()
        loss, mean = loss * (n_local.to(loss.device) * ranks.world / n_total), loss_sum / n_total
    else:
        n_total, mean = float(n_local), None
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return (loss.item() if mean is None else mean), int(n_total)


def _log(live, event: list) -> None:
    """Write one logged event (``["step", loss, lr]`` or ``["epoch", record]``) to DVCLive."""
    if live is None:
        return
    if event[0] == "step":
        live.log_metric("train/step_loss", event[1])
        live.log_metric("train/lr", event[2])
        live.next_step()
    else:
        for k in ("train_loss", "val_nll", "val_top1_acc"):
            live.log_metric(f"epoch/{k}", event[1][k])


def _setup(model: TasteModel, cfg: Train, ranks: Ranks):
    """The model on its device (wrapped in DDP under torchrun), AdamW and the loss scaler."""
    net = model.to(cfg.device)
    if ranks.world > 1:  # find_unused_parameters: the aggregator's last MLP gets no gradient (its read is the output)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None,
            find_unused_parameters=True)
    # float16 autocast (CUDA without bf16) needs loss scaling; for bfloat16 and float32 this is a no-op.
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=hardware.resolve_amp(cfg.amp, cfg.device) == "float16")
    return net, configure_optimizer(model, cfg), scaler


def _restore(model, opt, resume: Resume | None, rng: random.Random, live, out_dir: Path, info: dict, lead: bool):
    """A killed run's progress and best weights so far (fresh ones without a valid state): the RNG where
    the epoch began, the DVCLive logs DVC cleared written again, the best checkpoint back in place."""
    loaded = resume.load(model, opt) if resume else None
    if not loaded:
        return Progress(), None
    prog, best_state = loaded
    rng.setstate(prog.rng_state())
    for event in prog.events:
        _log(live, event)
    if best_state is not None and lead:
        now = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        save_checkpoint(model, out_dir, {"best": prog.best, **info})
        model.load_state_dict(now)
    print(f"resuming from {resume.dir}: epoch {prog.epoch}, step {prog.step}")
    return prog, best_state


def _end_epoch(model, val_ex, cfg: Train, prog: Progress, live, bar, out_dir: Path, info: dict, lead: bool,
               best_state: dict | None, keep_best: bool) -> tuple[bool, dict | None]:
    """Validate, log, keep the best checkpoint; (whether to stop early, the best weights for the resume state)."""
    val = summarize(predict(model, val_ex, cfg.batch_size * 2, cfg.device, amp=cfg.amp, buffer_rows=cfg.buffer_rows))
    record = {"epoch": prog.epoch, "train_loss": prog.losses / prog.counts, "val_nll": val["nll"],
              "val_top1_acc": val["top1_acc"]}
    prog.history.append(record)
    prog.events.append(["epoch", record])
    _log(live, prog.events[-1])
    bar.write(f"epoch {prog.epoch}: train {record['train_loss']:.3f}  val nll {val['nll']:.3f}  val top1 {val['top1_acc']:.3f}")
    if val["nll"] < prog.best["val_nll"]:
        prog.best, prog.bad_epochs = {"val_nll": val["nll"], "val_top1_acc": val["top1_acc"], "epoch": prog.epoch}, 0
        if lead:
            save_checkpoint(model, out_dir, {"best": prog.best, **info})
        if keep_best:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return False, best_state
    prog.bad_epochs += 1
    if prog.bad_epochs >= cfg.patience:
        bar.write(f"stopping: validation NLL has not improved for {cfg.patience} epochs")
        return True, best_state
    return False, best_state


def fit(model: TasteModel, train_ex, val_ex, cfg: Train, out_dir: str | Path,
        live=None, resume_dir: str | Path | None = None, fp: str = "", checkpoint_steps: int = 0,
        ranks: Ranks | None = None) -> dict:
    """Train with AdamW (the ``train`` params); keep the best-validation-NLL weights in ``out_dir``.

    With ``resume_dir``, the state is saved at every epoch end (and every ``checkpoint_steps`` steps
    when > 0) and a killed run started again with the same ``fp`` continues where it stopped. Under
    torchrun (``ranks.world`` > 1) the model is wrapped in DistributedDataParallel, every rank draws
    the same batch order and takes its share of each global batch (``train_step``); rank 0 alone
    writes checkpoints and logs. ``train_ex`` and ``val_ex`` are Subsets of a Split (or lists of
    Examples); a Loader keeps at most ``train.buffer_rows`` utterances of them in memory.
    """
    from tqdm import tqdm

    train_ex, val_ex = as_subset(train_ex), as_subset(val_ex)
    ranks = ranks or Ranks()
    lead, out_dir, live = ranks.rank == 0, Path(out_dir), live if ranks.rank == 0 else None
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    net, opt, scaler = _setup(model, cfg, ranks)
    total = planned_steps(train_ex, cfg)
    resume = Resume(resume_dir, fp, ranks, cfg.device) if resume_dir is not None else None
    # What made the features and the targets: the tokenizer rebuilds the same features from new audio.
    info = {"seed": cfg.seed, "train": dataclasses.asdict(cfg), "features": getattr(train_ex.source, "feature_meta", {}),
            "targets": getattr(train_ex.source, "meta", {}).get("targets", "")}
    prog, best_state = _restore(model, opt, resume, rng, live, out_dir, info, lead)
    if model.squeeze is not None and model.squeeze.levels and not model.squeeze.ready:
        n = init_codebooks(model, train_ex, cfg)
        if lead:
            print(f"codebooks: k-means over the speech vectors of {n} text tokens")
    # Only the other ranks pass ``disable``: passing it on the lead would override TQDM_DISABLE.
    bar = tqdm(total=total, initial=prog.step, desc="train", unit="step", **({} if lead else {"disable": True}))
    for epoch in range(prog.epoch, cfg.epochs):
        model.train()
        prog.epoch = epoch
        prog.set_rng(rng.getstate())  # this epoch's batch order is drawn from here
        loader = Loader(train_ex, batches(train_ex, cfg.batch_size, rng, cfg.buffer_rows), ranks.rank, ranks.world,
                        cfg.num_workers)
        if prog.batch == 0:
            prog.losses, prog.counts = 0.0, 0
        for b in range(prog.batch, len(loader)):
            for g in opt.param_groups:
                g["lr"] = lr_at(prog.step, total, cfg)
            loss, n = train_step(net, opt, scaler, loader.get(b), loader.share(loader.groups[b])[1], cfg, ranks)
            prog.losses, prog.counts, prog.step = prog.losses + loss * n, prog.counts + n, prog.step + 1
            prog.events.append(["step", loss, opt.param_groups[0]["lr"]])
            _log(live, prog.events[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if resume and checkpoint_steps and prog.step % checkpoint_steps == 0 and b + 1 < len(loader):
                prog.batch = b + 1
                resume.save(model, opt, best_state, prog)
        prog.batch = 0
        stop, best_state = _end_epoch(model, val_ex, cfg, prog, live, bar, out_dir, info, lead, best_state, bool(resume))
        if stop:
            break
        if resume:
            prog.epoch = epoch + 1
            prog.set_rng(rng.getstate())
            resume.save(model, opt, best_state, prog)
    bar.close()
    if lead:
        save_history(out_dir, prog.history)
        if resume:
            resume.clear()
    return {"best": prog.best, "history": prog.history, "steps": prog.step}


def build_model(vocab_size: int, d_query: int, d_audio: int, p: Train, whisper_model: str | None,
                text_model: str | None = None, max_units_per_token: float = 0.0, d_speaker: int = 256) -> TasteModel:
    """A fresh model of the variant whose params are ``p`` (its parts: ``p.speech``, ``p.squeeze``,
    ``p.unit_alignment``). With ``speech: tokens`` the aggregator starts from Whisper's decoder with
    ``agg_init: whisper`` (behind the family's task prefix, ``whisper.prefix_tokens``), else random with
    Whisper's shape rule for its width (64-wide heads, FFN 4x the width).

    ``text_model`` is the text table's ``text.model``: with ``agg_init: whisper`` the Whisper decoder
    reads the text embeddings, so they must be that Whisper's own. ``max_units_per_token``: the training
    split's (``data.max_units_per_token``), the free-running length cap. ``d_speaker``: the speaker
    table's embedding width (``speaker: embedding``).

    The initial weights follow ``train.seed``: torch seeds its default generator at random in every
    process, so without this the same params would train a different model each run.
    """
    torch.manual_seed(p.seed)
    cfg = ModelConfig.build(p, vocab_size=vocab_size, d_query=d_query, d_audio=d_audio,
                            max_units_per_token=max_units_per_token, d_speaker=d_speaker)
    if p.speech != "tokens":
        return TasteModel(cfg)
    if p.agg_init == "fresh":
        if d_audio % 64:
            raise ValueError(f"train.agg_init: fresh gives the aggregator 64-wide heads, but the Whisper width "
                             f"(whisper.model) is {d_audio}, not a multiple of 64")
        return TasteModel(dataclasses.replace(cfg, agg_heads=d_audio // 64, agg_ffn=4 * d_audio))
    from . import whisper

    if text_model is not None and text_model != whisper_model:
        raise ValueError(f"train.agg_init: whisper makes {whisper_model!r} (whisper.model)'s decoder read the text "
                         f"embeddings, but the text table was made with text.model {text_model!r}: set text.model "
                         f"to whisper.model, or use train.agg_init: fresh")
    wm = whisper.load_model(whisper_model)
    prefix = whisper.prefix_tokens(whisper.load_tokenizer(whisper_model), wm.config.vocab_size, p.agg_language)
    model = TasteModel(dataclasses.replace(cfg, agg_heads=wm.config.decoder_attention_heads, agg_prefix=len(prefix),
                                           agg_ffn=wm.config.decoder_ffn_dim, max_text=wm.config.max_target_positions))
    model.speech.aggregator.init_from_whisper(wm, prefix)
    return model


def init_from(model: TasteModel, init_dir: str | Path) -> dict[str, list[str]]:
    """Start ``model`` from another variant's best checkpoint (``train.finetune.<name>.init``): every
    tensor both have, of the same shape, is copied; what only ``model`` has keeps its fresh value.
    Returns what was copied and what was left fresh; a shape that differs is an error."""
    from safetensors.torch import load_file

    theirs = load_file(str(Path(init_dir) / "model.safetensors"))
    ours = model.state_dict()
    wrong = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if wrong:
        raise ValueError(f"{init_dir}: cannot start from it, shapes differ for {wrong[:5]} "
                         f"(the two variants must share d_model, n_layers, ... in train params)")
    copied = [k for k in ours if k in theirs]
    model.load_state_dict({**ours, **{k: theirs[k] for k in copied}})
    return {"copied": copied, "fresh": [k for k in ours if k not in theirs]}


@dataclasses.dataclass
class Prepared:
    """A variant ready for ``fit``: its model, the speaker-disjoint train/validation examples, the split's
    metadata, the resume fingerprint and, for a finetuned variant, what ``init_from`` copied."""

    model: TasteModel
    train_ex: Subset
    val_ex: Subset
    meta: dict
    fingerprint: str
    init: dict[str, list[str]] | None


def prepare(name: str, p: Train, tables: dict[str, str | Path | None], whisper_model: str, base_seed: int,
            init_dir: str | Path | None = None) -> Prepared:
    """What the train stage does between its params and ``fit``, for variant ``name`` (``p``: its params,
    device and amp resolved), shared by every runner so they cannot drift apart. ``tables``: the train
    split's ``manifest``, ``whisper``, ``text`` and ``s3`` tables, and ``speaker`` / ``words`` (read only
    when ``p.speaker`` / ``p.unit_alignment: oracle`` asks for them). The validation speakers follow
    ``base_seed`` (base.seed), not train.seed: seeds then differ only in initialization and batch order,
    so a seed sweep compares variants on the same data."""
    speaker = tables.get("speaker") if p.speaker != "none" else None
    words = tables.get("words") if p.unit_alignment == "oracle" else None
    if p.speaker != "none" and speaker is None:
        raise ValueError(f"train.speaker: {p.speaker} reads the speaker stage's table, and none was given")
    if p.unit_alignment == "oracle" and (words is None or not Path(words).is_file()):
        raise FileNotFoundError(f"train.unit_alignment: oracle reads true word timings, and {words} is not there "
                                "(the synthesize stage writes them for the embedded corpus; other corpora have none)")
    inputs = [tables[k] for k in ("manifest", "whisper", "text", "s3")]
    split, meta = load_split(*inputs, speaker, words)
    train_ex, val_ex = speaker_split(split, p.val_speakers, base_seed)
    model = build_model(int(meta["vocab_size"]), *split.widths, p, whisper_model, split.text_model,
                        max_units_per_token(train_ex), split.speaker_width)
    copied = init_from(model, init_dir) if init_dir is not None else None
    fp = fingerprint(p, name, [*inputs, *(t for t in (speaker, words) if t is not None)])
    return Prepared(model, train_ex, val_ex, meta, fp, copied)
