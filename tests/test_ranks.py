"""torchrun with 2 CPU ranks writes the same extraction tables as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # torchrun with 2 processes: deselect with -m 'not slow'

REPO = Path(__file__).resolve().parents[1]
# The ranks are told apart by their progress bars: keep them on whatever the caller's environment says.
ENV = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}


def _torchrun(n, args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stage", ["whisper", "s3"])
def test_two_ranks_write_the_same_table_as_one_process(tiny_resampled, tmp_path, stage):
    from taste_pipeline import s3

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["whisper"]["rows_per_group"] = doc["s3"]["rows_per_group"] = 3  # 8 utterances: groups 0, 2 on rank 0, 1 on rank 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    manifest = tiny_resampled / "manifest.parquet"
    if stage == "whisper":
        args = lambda out, part: [REPO / "stages" / "whisper.py", manifest, out, "--partial-dir", part]  # noqa: E731
    else:
        s3.prepare_tokenizer(s3.STANDIN, tmp_path / "tok", manifest, 8, 0)
        args = lambda out, part: [REPO / "stages" / "s3.py", manifest, tmp_path / "tok", out, "--partial-dir", part]  # noqa: E731
    one = subprocess.run([sys.executable, *map(str, args(tmp_path / "one.parquet", tmp_path / "p1"))], cwd=tmp_path,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    if stage == "whisper":  # the param: the stage starts torchrun itself
        doc["whisper"]["processes"] = 2
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
        two = subprocess.run([sys.executable, *map(str, args(tmp_path / "two.parquet", tmp_path / "p2"))],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True)
    else:  # torchrun by hand, as on several machines
        two = _torchrun(2, args(tmp_path / "two.parquet", tmp_path / "p2"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{stage} tiny-train rank 1/2" in two.stderr  # both ranks really worked
    assert (tmp_path / "two.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
    assert not (tmp_path / "p2").exists()


TRAIN_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_train import _examples
from taste_pipeline import data, train
from taste_pipeline.model import ModelConfig, TasteModel
from taste_pipeline.train_params import Train
from taste_pipeline.ranks import Ranks

class Recorder:
    def __init__(self): self.rows, self.step = [], 0
    def log_metric(self, name, value): self.rows.append([self.step, name, value])
    def next_step(self): self.step += 1

ranks = Ranks.from_env()
tr, va = data.speaker_split(_examples(n=30), 1, seed=0)
torch.manual_seed(0)
model = TasteModel(ModelConfig(speech="tokens", vocab_size=8, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                               agg_layers=1, agg_heads=2, agg_ffn=64, dropout=0.0))
cfg = Train(lr=3e-3, epochs=3, batch_size=5, warmup_steps=2, patience=10, amp=False, seed=4, dropout=0.0)
live = Recorder()
summary = train.fit(model, tr, va, cfg, sys.argv[2], live, ranks=ranks)
if ranks.rank == 0:
    json.dump({"history": summary["history"], "steps": [r[2] for r in live.rows if r[1] == "train/step_loss"]},
              open(sys.argv[3], "w"))
"""


def test_two_rank_ddp_follows_the_single_process_loss_trajectory(tmp_path):
    import json

    import numpy as np

    tests = str(Path(__file__).parent)
    (tmp_path / "child.py").write_text(TRAIN_CHILD)
    one = subprocess.run([sys.executable, tmp_path / "child.py", tests, tmp_path / "m1", tmp_path / "one.json"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, [tmp_path / "child.py", tests, tmp_path / "m2", tmp_path / "two.json"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    # 23 train utterances in global batches of 5: the last batch (3) leaves one rank a share of 1
    assert len(a["steps"]) == len(b["steps"]) == 15
    np.testing.assert_allclose(b["steps"], a["steps"], rtol=1e-4, atol=1e-5)
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["val_nll"] == pytest.approx(ra["val_nll"], rel=1e-4)
    assert a["steps"][-1] < a["steps"][0]  # it is training, not standing still
