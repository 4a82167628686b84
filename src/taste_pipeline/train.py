"""Data joining, batching and the training loop (nanoGPT-shaped: config, data, eval, loop).

The loop keeps the checkpoint with the best validation NLL on a speaker-disjoint validation split
carved from train: small models overfit this corpus fast, and overall accuracy is dominated by
copying the previous unit, so it is too noisy to stop on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import hardware, tables
from .model import ModelConfig, TasteModel
from .params import Train
from .ranks import Ranks


@dataclass
class Example:
    utt_id: str
    speaker_id: str
    text: str
    token_ids: np.ndarray
    text_emb: torch.Tensor  # (L, dq) float16
    mid: torch.Tensor  # (F, da) float16
    last: torch.Tensor  # (F, da) float16
    units: torch.Tensor  # (T,) int64


def load_split(manifest_path, whisper_path, text_path, s3_path) -> tuple[list[Example], dict]:
    """Join the four tables of a split on utt_id; an utterance missing from any of them is an error."""
    manifest = tables.read_manifest(manifest_path)
    w, t, s = tables.read_whisper(whisper_path), tables.read_text(text_path), tables.read_s3(s3_path)
    ids = manifest.column("utt_id").to_pylist()
    index = {}
    for name, table in (("whisper", w), ("text", t), ("s3", s)):
        pos = {u: i for i, u in enumerate(table.column("utt_id").to_pylist())}
        missing = [u for u in ids if u not in pos]
        if missing:
            raise ValueError(f"{name} table lacks utterance {missing[0]} (and {len(missing) - 1} more) of {manifest_path}")
        index[name] = pos
    rows = manifest.select(["utt_id", "speaker_id", "text"]).to_pylist()
    token_ids = t.column("token_ids").to_pylist()
    tokens = s.column("tokens").to_pylist()
    out = []
    for r in rows:
        u = r["utt_id"]
        out.append(Example(
            utt_id=u, speaker_id=r["speaker_id"], text=r["text"],
            token_ids=np.asarray(token_ids[index["text"][u]]),
            text_emb=torch.from_numpy(tables.row_matrix(t, "emb", index["text"][u]).copy()),
            mid=torch.from_numpy(tables.row_matrix(w, "mid", index["whisper"][u]).copy()),
            last=torch.from_numpy(tables.row_matrix(w, "last", index["whisper"][u]).copy()),
            units=torch.tensor(tokens[index["s3"][u]], dtype=torch.long)))
    meta = {k.decode(): v.decode() for k, v in (s.schema.metadata or {}).items()}
    return out, meta


def speaker_split(examples: list[Example], val_speakers: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_speakers`` whole speakers (chosen with the seed) for validation."""
    speakers = sorted({e.speaker_id for e in examples})
    if not 1 <= val_speakers < len(speakers):
        raise ValueError(f"train.val_speakers: {val_speakers} of {len(speakers)} train speakers leaves nothing to train or validate on")
    held = set(random.Random(seed).sample(speakers, val_speakers))
    return [e for e in examples if e.speaker_id not in held], [e for e in examples if e.speaker_id in held]


def collate(examples: list[Example], speech_from: list[Example] | None = None) -> dict:
    """Pad a batch. ``speech_from``: take each item's Whisper states from another utterance (control)."""
    speech = speech_from or examples
    B = len(examples)
    L = max(len(e.text_emb) for e in examples)
    Fr = max(len(e.mid) for e in speech)
    T = max(len(e.units) for e in examples)
    dq, da = examples[0].text_emb.shape[1], speech[0].mid.shape[1]
    batch = {"text_emb": torch.zeros(B, L, dq), "mid": torch.zeros(B, Fr, da), "last": torch.zeros(B, Fr, da),
             "units": torch.zeros(B, T, dtype=torch.long)}
    for i, (e, s) in enumerate(zip(examples, speech)):
        batch["text_emb"][i, : len(e.text_emb)] = e.text_emb.float()
        batch["mid"][i, : len(s.mid)] = s.mid.float()
        batch["last"][i, : len(s.last)] = s.last.float()
        batch["units"][i, : len(e.units)] = e.units
    batch["text_len"] = torch.tensor([len(e.text_emb) for e in examples])
    batch["frame_len"] = torch.tensor([len(s.mid) for s in speech])
    batch["unit_len"] = torch.tensor([len(e.units) for e in examples])
    return batch


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batches(examples: list[Example], batch_size: int, rng: random.Random | None = None):
    """Batches of similar length (less padding); shuffled batch order when ``rng`` is given."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].units), examples[i].utt_id))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    return groups


@torch.no_grad()
def predict(model: TasteModel, examples: list[Example], batch_size: int, device: str = "cpu",
            speech_from: list[Example] | None = None, amp: bool | str = False) -> list[dict]:
    """Teacher-forced predictions per utterance: argmax, per-position NLL, targets (units + END)."""
    model.eval()
    out: list[dict] = [None] * len(examples)
    for group in batches(examples, batch_size):
        batch = collate([examples[i] for i in group], [speech_from[i] for i in group] if speech_from else None)
        with autocast(device, amp):
            logits, targets, nll = model(to_device(batch, device), reduction="none")
        for j, i in enumerate(group):
            n = int(batch["unit_len"][j]) + 1
            out[i] = {"pred": logits[j, :n].argmax(-1).cpu().numpy(), "nll": nll[j, :n].cpu().numpy(),
                      "target": targets[j, :n].cpu().numpy()}
    return out


def summarize(preds: list[dict]) -> dict:
    """NLL per target unit and top-1 over every unit position (END excluded)."""
    nll = np.concatenate([p["nll"][:-1] for p in preds])
    hit = np.concatenate([p["pred"][:-1] == p["target"][:-1] for p in preds])
    return {"nll": float(nll.mean()), "top1_acc": float(hit.mean())}


def autocast(device: str, amp: bool | str):
    """Autocast for ``train.amp`` (``auto`` resolved here for ``device``; float32 = off)."""
    dtype = hardware.resolve_amp(amp, device)
    return torch.autocast(device.split(":")[0], dtype=hardware.DTYPES[dtype], enabled=dtype != "float32")


def lr_at(step: int, total: int, cfg: Train) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: TasteModel, out_dir: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with tables.atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps({"model_args": model.model_args(), **info}, indent=2) + "\n")


def load_checkpoint(model_dir: str | Path, device: str = "cpu") -> tuple[TasteModel, dict]:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "config.json").read_text())
    model = TasteModel(ModelConfig(**info["model_args"]))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    if (model_dir / "history.json").exists():
        info["history"] = json.loads((model_dir / "history.json").read_text())
    return model.to(device).eval(), info


# ---------------------------------------------------------------------------------------------
# Resume: a run killed part-way continues from its last saved step, with the same result.
#
# DVC deletes a stage's outputs before it runs, so the resume state lives beside them (``resume_dir``,
# not a DVC output): weights, AdamW moments, both RNG states, the position in the epoch's batch order,
# the best weights so far and every value logged to DVCLive (replayed, so the logs match too).
# It is used only when its fingerprint (params + input tables) matches, and removed when the run ends.

RESUME_STATE, RESUME_INFO = "state.safetensors", "state.json"


def fingerprint(cfg: Train, variant: str, inputs: list[str | Path] = ()) -> str:
    """What must not change for a saved state to be resumed: the train params, the variant and the
    input tables (size and Parquet footer, which hold row counts, offsets and column statistics)."""
    import hashlib

    # The device is left out: under torchrun each rank has its own (cuda:0, cuda:1, ...), and all ranks
    # must agree on whether a state resumes.
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    h = hashlib.sha256(json.dumps({"train": train, "variant": variant}, sort_keys=True).encode())
    for path in inputs:
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 65536))
            h.update(str(size).encode() + f.read())
    return h.hexdigest()


def _rng_file(rank: int) -> str:
    return f"rng.rank{rank}.safetensors"


def _rng_states(device: str) -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _save_resume(resume_dir: Path, model: TasteModel, opt: torch.optim.Optimizer, best_state: dict | None,
                 info: dict, ranks: Ranks, device: str) -> None:
    """Every rank writes its own RNG states (dropout draws differ per rank); rank 0 then writes the rest."""
    from safetensors.torch import save_file

    resume_dir.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(resume_dir / _rng_file(ranks.rank)) as tmp:
        save_file(_rng_states(device), str(tmp))
    ranks.barrier()
    if ranks.rank != 0:
        ranks.barrier()
        return
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.contiguous() if torch.is_tensor(v) else torch.tensor(v)
    info = dict(info, world=ranks.world, rng_bytes=[(resume_dir / _rng_file(r)).stat().st_size for r in range(ranks.world)], param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]])
    # Two files, one state: the weights are written first, and the JSON (what makes the state valid)
    # last, naming the weights file by its size, so a kill between the two leaves an unusable, not a
    # mismatched, pair.
    with tables.atomic_path(resume_dir / RESUME_STATE) as tmp:
        save_file(tensors, str(tmp))
    info["state_bytes"] = (resume_dir / RESUME_STATE).stat().st_size
    with tables.atomic_path(resume_dir / RESUME_INFO) as tmp:
        tmp.write_text(json.dumps(info) + "\n")
    ranks.barrier()  # no rank goes on (and could be killed) before the state is whole


def _load_resume(resume_dir: Path, fp: str, ranks: Ranks | None = None) -> tuple[dict, dict] | None:
    """The saved state, with this rank's own RNG states, if it is valid for every rank; else None."""
    from safetensors.torch import load_file

    ranks = ranks or Ranks()
    info_path, state_path = resume_dir / RESUME_INFO, resume_dir / RESUME_STATE
    rng_path = resume_dir / _rng_file(ranks.rank)
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    ok = (state_path.exists() and rng_path.exists() and info.get("fingerprint") == fp
          and info.get("state_bytes") == state_path.stat().st_size and info.get("world") == ranks.world
          and info["rng_bytes"][ranks.rank] == rng_path.stat().st_size)
    if ranks.world > 1:  # resume everywhere or nowhere: ranks that disagree would diverge or hang
        flag = torch.tensor([int(ok)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        return None
    return info, {**load_file(str(state_path)), **load_file(str(rng_path))}


def _ddp_backward(net, opt, scaler, examples: list[Example], ranks: Ranks, cfg: Train) -> tuple[torch.Tensor, int]:
    """This rank's share of one global batch: forward, and backward of its token-weighted loss.

    DDP averages gradients over ranks, so each rank's mean loss is scaled by (its target tokens x world
    / the batch's target tokens): the averaged gradient is then that of the whole batch's token mean.
    Returns the whole batch's mean loss and its number of target tokens (for logging).
    """
    mine = examples[ranks.rank :: ranks.world]
    weight = 1.0
    if not mine:  # a last batch smaller than the world: this rank still takes part, with zero weight
        mine, weight = examples[:1], 0.0
    batch = to_device(collate(mine), cfg.device)
    with autocast(cfg.device, cfg.amp):
        _, targets, loss = net(batch)
    n_local = (targets != -100).sum().float() * weight
    stats = torch.stack([n_local, loss.detach().float() * n_local])
    if torch.distributed.get_backend() != "nccl":
        stats = stats.cpu()
    torch.distributed.all_reduce(stats)
    n_total, loss_sum = stats.tolist()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * (n_local.to(loss.device) * ranks.world / n_total)).backward()
    return torch.tensor(loss_sum / n_total), int(n_total)


def fit(model: TasteModel, train_ex: list[Example], val_ex: list[Example], cfg: Train, out_dir: str | Path,
        live=None, resume_dir: str | Path | None = None, fp: str = "", checkpoint_steps: int = 0,
        ranks: Ranks | None = None) -> dict:
    """Train with AdamW (the ``train`` params); keep the best-validation-NLL weights in ``out_dir``.

    With ``resume_dir``, the state is saved at every epoch end (and every ``checkpoint_steps`` steps
    when > 0) and a killed run started again with the same ``fp`` continues where it stopped.

    Under torchrun (``ranks`` with world > 1) the model is wrapped in DistributedDataParallel and each
    global batch of ``train.batch_size`` is split across the ranks; every rank draws the same batch
    order, and the loss is weighted by each rank's share of the batch's target tokens, so the step is
    the one a single process takes on the whole batch (up to float rounding and dropout draws).
    Rank 0 alone writes checkpoints, resume state and logs.
    """
    from tqdm import tqdm

    ranks = ranks or Ranks()
    lead = ranks.rank == 0
    if not lead:
        live = None
    out_dir = Path(out_dir)
    seed = cfg.seed
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.to(cfg.device)
    net = model
    if ranks.world > 1:
        # find_unused_parameters: with agg_output "attention" the aggregator's last residual branch
        # gets no gradient at all (single-process training simply leaves it unchanged too).
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None,
            find_unused_parameters=True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    # float16 autocast (CUDA without bf16) needs loss scaling; for bfloat16 and float32 this is a no-op.
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=hardware.resolve_amp(cfg.amp, cfg.device) == "float16")
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    best = {"val_nll": float("inf"), "epoch": -1}
    best_state: dict | None = None
    step, bad_epochs, start_epoch, start_batch = 0, 0, 0, 0
    losses, counts = 0.0, 0
    history: list[dict] = []
    events: list[list] = []  # everything logged to DVCLive, in order: ["step", loss, lr] or ["epoch", record]
    resume_dir = Path(resume_dir) if resume_dir is not None else None
    saved = _load_resume(resume_dir, fp, ranks) if resume_dir is not None else None
    if saved is not None:
        info, tensors = saved
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        opt_state = {"state": {}, "param_groups": [dict(g, params=og["params"]) for g, og in
                                                   zip(info["param_groups"], opt.state_dict()["param_groups"])]}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = v
        opt.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], cfg.device)
        step, bad_epochs, best, history, events = info["step"], info["bad_epochs"], info["best"], info["history"], info["events"]
        start_epoch, start_batch, losses, counts = info["epoch"], info["batch"], info["losses"], info["counts"]
        epoch_rng = info["epoch_rng"]
        rng.setstate((epoch_rng[0], tuple(epoch_rng[1]), epoch_rng[2]))
        if live is not None:  # DVC cleared the old logs with the outputs: write them again, unchanged
            for e in events:
                if e[0] == "step":
                    live.log_metric("train/step_loss", e[1])
                    live.log_metric("train/lr", e[2])
                    live.next_step()
                else:
                    for k in ("train_loss", "val_nll", "val_top1_acc"):
                        live.log_metric(f"epoch/{k}", e[1][k])
        if best_state is not None and lead:
            model_now = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best_state)
            save_checkpoint(model, out_dir, {"best": best, "seed": seed, "train": dataclasses.asdict(cfg)})
            model.load_state_dict(model_now)
        print(f"resuming {model.cfg.variant} from {resume_dir}: epoch {start_epoch}, step {step}")

    def save_state(epoch: int, batch: int, epoch_rng) -> None:
        if resume_dir is None:
            return
        _save_resume(resume_dir, model, opt, best_state, {
            "fingerprint": fp, "epoch": epoch, "batch": batch, "step": step, "bad_epochs": bad_epochs,
            "best": best, "history": history, "events": events, "losses": losses, "counts": counts,
            "epoch_rng": [epoch_rng[0], list(epoch_rng[1]), epoch_rng[2]]}, ranks, cfg.device)

    bar = tqdm(total=total, initial=step, desc=f"train {model.cfg.variant}", unit="step", disable=not lead)
    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        epoch_rng = rng.getstate()  # the batch order of this epoch is drawn from here
        groups = batches(train_ex, cfg.batch_size, rng)
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            losses, counts = 0.0, 0
        for b, group in enumerate(groups[first:], first):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            if ranks.world == 1:
                batch = to_device(collate([train_ex[i] for i in group]), cfg.device)
                with autocast(cfg.device, cfg.amp):
                    _, targets, loss = net(batch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                n = int((targets != -100).sum())
            else:
                loss, n = _ddp_backward(net, opt, scaler, [train_ex[i] for i in group], ranks, cfg)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            losses, counts = losses + loss.item() * n, counts + n
            events.append(["step", loss.item(), opt.param_groups[0]["lr"]])
            if live is not None:
                live.log_metric("train/step_loss", loss.item())
                live.log_metric("train/lr", opt.param_groups[0]["lr"])
                live.next_step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if checkpoint_steps and step % checkpoint_steps == 0 and b + 1 < len(groups):
                save_state(epoch, b + 1, epoch_rng)
        val = summarize(predict(model, val_ex, cfg.batch_size * 2, cfg.device, amp=cfg.amp))
        record = {"epoch": epoch, "train_loss": losses / counts, "val_nll": val["nll"], "val_top1_acc": val["top1_acc"]}
        history.append(record)
        events.append(["epoch", record])
        if live is not None:
            for k in ("train_loss", "val_nll", "val_top1_acc"):
                live.log_metric(f"epoch/{k}", record[k])
        bar.write(f"epoch {epoch}: train {record['train_loss']:.3f}  val nll {val['nll']:.3f}  val top1 {val['top1_acc']:.3f}")
        if val["nll"] < best["val_nll"]:
            best = {"val_nll": val["nll"], "val_top1_acc": val["top1_acc"], "epoch": epoch}
            if lead:
                save_checkpoint(model, out_dir, {"best": best, "seed": seed, "train": dataclasses.asdict(cfg)})
            if resume_dir is not None:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                bar.write(f"stopping: validation NLL has not improved for {cfg.patience} epochs")
                stopped = True
        if stopped:
            break
        save_state(epoch + 1, 0, rng.getstate())
    bar.close()
    if not lead:
        return {"best": best, "history": history, "steps": step}
    with tables.atomic_path(out_dir / "history.json") as tmp:
        tmp.write_text(json.dumps(history, indent=2) + "\n")
    if resume_dir is not None:
        import shutil

        shutil.rmtree(resume_dir, ignore_errors=True)
    return {"best": best, "history": history, "steps": step}


def build_model(variant: str, vocab_size: int, d_query: int, d_audio: int, p: Train,
                whisper_model: str | None) -> TasteModel:
    """A fresh model from the ``train`` params; the aggregator starts from Whisper when asked.

    The initial weights follow ``train.seed``: torch seeds its default generator at random in every
    process, so without this the same params would train a different model each run.
    """
    torch.manual_seed(p.seed)
    cfg = ModelConfig(variant=variant, vocab_size=vocab_size, d_query=d_query, d_audio=d_audio,
                      agg_layers=p.agg_layers, agg_value_layers=p.agg_value_layers,
                      agg_freeze_alignment=p.agg_freeze_alignment, agg_output=p.agg_output, agg_init=p.agg_init,
                      unit_positions=p.unit_positions, text_dropout=p.text_dropout if variant == "taste" else 0.0, d_model=p.d_model, n_heads=p.n_heads,
                      n_layers=p.n_layers, d_ff=p.d_ff, max_len=p.max_len, dropout=p.dropout)
    if variant == "taste" and p.agg_init == "whisper":
        from . import whisper

        wm = whisper.load_model(whisper_model)
        cfg.agg_heads, cfg.agg_ffn, cfg.max_text = (wm.config.decoder_attention_heads, wm.config.decoder_ffn_dim,
                                                    wm.config.max_target_positions)
        model = TasteModel(cfg)
        model.aggregator.init_from_whisper(wm)
        return model
    return TasteModel(cfg)
