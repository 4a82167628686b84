"""Checkpoints (safetensors weights + ``model_args``, nanoGPT's way) and the resume state of a killed
training run.

Resume: DVC deletes a stage's outputs before it runs, so the state lives beside them (``resume_dir``,
not a DVC output): weights, AdamW moments, the best weights so far, the loop's progress (step, place in
the epoch's batch order, everything logged to DVCLive, so the logs can be replayed) and, per rank, the
RNG states (dropout draws differ per rank). It is used only when its fingerprint (params + input
tables) matches for every rank, and removed when the run ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tables
from .model import ModelConfig, TasteModel
from .ranks import Ranks

MODEL_FILE, CONFIG_FILE, HISTORY_FILE = "model.safetensors", "config.json", "history.json"
RESUME_STATE, RESUME_INFO = "state.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint this version cannot load; says what changed and how to rebuild it."""


def save_checkpoint(model: TasteModel, out_dir: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(out_dir / MODEL_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with tables.atomic_path(out_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({"model_args": model.model_args(), **info}, indent=2) + "\n")


def save_history(out_dir: str | Path, history: list[dict]) -> None:
    with tables.atomic_path(Path(out_dir) / HISTORY_FILE) as tmp:
        tmp.write_text(json.dumps(history, indent=2) + "\n")


def load_checkpoint(model_dir: str | Path, device: str = "cpu") -> tuple[TasteModel, dict]:
    """The model rebuilt from its ``model_args`` alone, in eval mode, and the checkpoint's info."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = json.loads((model_dir / CONFIG_FILE).read_text())
    args = info["model_args"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if "variant" in args or set(args) - known:
        what = (f"variant: {args['variant']!r}, where a variant is now a choice of parts (speech, squeeze, "
                f"unit_alignment)" if "variant" in args else f"{sorted(set(args) - known)}, params the model no longer has")
        raise CheckpointError(f"{model_dir}: saved by an older version of the model ({CONFIG_FILE} has {what}); "
                              f"rebuild it with: dvc repro --glob '*@{model_dir.name}'")
    # Fields a checkpoint made before them lacks, with what that model did: no voice, tokens read at themselves.
    model = TasteModel(ModelConfig(**{"speaker": "none", "agg_read_shift": 0, **args}))
    model.load_state_dict(load_file(str(model_dir / MODEL_FILE)))
    if (model_dir / HISTORY_FILE).exists():
        info["history"] = json.loads((model_dir / HISTORY_FILE).read_text())
    return model.to(device).eval(), info


def fingerprint(cfg, variant: str, inputs: list[str | Path] = ()) -> str:
    """What must not change for a saved state to be resumed: the train params, the variant and the
    input tables (size and Parquet footer, which hold row counts, offsets and column statistics).

    The device is left out: under torchrun each rank has its own (cuda:0, cuda:1, ...), and all ranks
    must agree on whether a state resumes. So is ``num_workers``: it changes how batches are read, not
    which.
    """
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "num_workers")}
    h = hashlib.sha256(json.dumps({"train": train, "variant": variant}, sort_keys=True).encode())
    for path in inputs:
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 65536))
            h.update(str(size).encode() + f.read())
    return h.hexdigest()


@dataclass
class Progress:
    """Where the training loop is: what a resumed run needs besides tensors (saved as JSON)."""

    epoch: int = 0
    batch: int = 0  # first batch of ``epoch`` still to run
    step: int = 0
    bad_epochs: int = 0
    best: dict = field(default_factory=lambda: {"val_nll": math.inf, "epoch": -1})
    history: list = field(default_factory=list)
    events: list = field(default_factory=list)  # all logged to DVCLive, in order: ["step", loss, lr] / ["epoch", record]
    losses: float = 0.0  # this epoch's token-weighted loss sum and token count so far
    counts: int = 0
    rng: list | None = None  # the batch-order RNG's state at the start of ``epoch``

    def rng_state(self) -> tuple:
        return self.rng[0], tuple(self.rng[1]), self.rng[2]

    def set_rng(self, state: tuple) -> None:
        self.rng = [state[0], list(state[1]), state[2]]


def _rng_file(rank: int) -> str:
    return f"rng.rank{rank}.safetensors"


class Resume:
    """The resume state of one training run in ``resume_dir``, for this process's rank."""

    def __init__(self, resume_dir: str | Path, fp: str, ranks: Ranks | None = None, device: str = "cpu"):
        self.dir, self.fp, self.ranks, self.device = Path(resume_dir), fp, ranks or Ranks(), device

    def save(self, model: TasteModel, opt: torch.optim.Optimizer, best_state: dict | None, prog: Progress) -> None:
        """Every rank writes its RNG states; then rank 0 writes the weights, and last the JSON that makes
        the state valid (naming the other files by size, so a kill between them leaves an unusable, not
        a mismatched, state)."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        rng = {"rng.torch": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        with tables.atomic_path(self.dir / _rng_file(self.ranks.rank)) as tmp:
            save_file(rng, str(tmp))
        self.ranks.barrier()
        if self.ranks.rank == 0:
            tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
            if best_state is not None:
                tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
            opt_state = opt.state_dict()
            for i, st in opt_state["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{i}.{k}"] = v.contiguous() if torch.is_tensor(v) else torch.tensor(v)
            with tables.atomic_path(self.dir / RESUME_STATE) as tmp:
                save_file(tensors, str(tmp))
            info = {"fingerprint": self.fp, "world": self.ranks.world, **dataclasses.asdict(prog),
                    "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
                    "state_bytes": (self.dir / RESUME_STATE).stat().st_size,
                    "rng_bytes": [(self.dir / _rng_file(r)).stat().st_size for r in range(self.ranks.world)]}
            with tables.atomic_path(self.dir / RESUME_INFO) as tmp:
                tmp.write_text(json.dumps(info) + "\n")
        self.ranks.barrier()  # no rank goes on (and could be killed) before the state is whole

    def read(self) -> tuple[dict, dict] | None:
        """The saved info and tensors (this rank's RNG states included) if valid for every rank, else None."""
        from safetensors.torch import load_file

        info_path, state_path, rng_path = self.dir / RESUME_INFO, self.dir / RESUME_STATE, self.dir / _rng_file(self.ranks.rank)
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        ok = (state_path.exists() and rng_path.exists() and info.get("fingerprint") == self.fp
              and info.get("state_bytes") == state_path.stat().st_size and info.get("world") == self.ranks.world
              and info["rng_bytes"][self.ranks.rank] == rng_path.stat().st_size)
        if self.ranks.world > 1:  # resume everywhere or nowhere: ranks that disagree would diverge or hang
            flag = torch.tensor([int(ok)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item())
        if not ok:
            return None
        return info, {**load_file(str(state_path)), **load_file(str(rng_path))}

    def load(self, model: TasteModel, opt: torch.optim.Optimizer) -> tuple[Progress, dict | None] | None:
        """Restore model, optimizer and RNG states; returns the progress and the best weights so far."""
        saved = self.read()
        if saved is None:
            return None
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
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        names = {f.name for f in dataclasses.fields(Progress)}
        return Progress(**{k: v for k, v in info.items() if k in names}), best_state

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
