"""A training run killed with SIGKILL part-way resumes and ends exactly where an uninterrupted run does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
from test_train import _examples
from taste_pipeline import data, train
from taste_pipeline.model import ModelConfig, TasteModel
from taste_pipeline.train_params import Train
from taste_pipeline.ranks import Ranks
out_dir, resume_dir, kill_at, log_path = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ranks = Ranks.from_env()  # under torchrun: 2 ranks, and only the last one is killed
calls = {"n": 0}
collate = train.collate  # the name the loop calls
def dying_collate(*a, **kw):  # SIGKILL: no cleanup, no finally blocks, as when the machine kills us
    calls["n"] += 1
    if calls["n"] == kill_at and ranks.rank == ranks.world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return collate(*a, **kw)
train.collate = dying_collate

class Recorder:  # stands in for DVCLive: what would be in the logs
    def __init__(self): self.rows, self.step = [], 0
    def log_metric(self, name, value): self.rows.append([self.step, name, value])
    def next_step(self): self.step += 1

tr, va = data.speaker_split(_examples(), 1, seed=0)
cfg = Train(lr=3e-3, epochs=4, batch_size=4, warmup_steps=2, patience=10, amp=False, seed=3, dropout=0.1,
            checkpoint_steps=2)
live = Recorder()
torch.manual_seed(0)
model = TasteModel(ModelConfig(speech="tokens", vocab_size=8, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                               agg_layers=1, agg_heads=2, agg_ffn=64, dropout=0.1))  # dropout: RNG matters
summary = train.fit(model, tr, va, cfg, out_dir, live, resume_dir if resume_dir != "-" else None, "fp", 2,
                    ranks=ranks)
if ranks.rank == 0:
    json.dump({"history": summary["history"], "log": live.rows}, open(log_path, "w"))
"""


def _run(tmp_path, out, resume, kill_at, log, ranks=1):
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [str(Path(__file__).parent), str(out), str(resume), str(kill_at), str(log)]
    if ranks == 1:
        return subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
    (tmp_path / "child.py").write_text(CHILD)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(tmp_path / "child.py"), *args], env=env, capture_output=True, text=True, timeout=600)


def _same_result(a_dir, b_dir):
    want, got = load_file(a_dir / "model" / "model.safetensors"), load_file(b_dir / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a, b = json.loads((a_dir / "log.json").read_text()), json.loads((b_dir / "log.json").read_text())
    assert a["history"] == b["history"] and a["log"] == b["log"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    r = _run(d, d / "model", "-", 0, d / "log.json")
    assert r.returncode == 0, r.stderr[-2000:]
    return d


# collate calls: 5 training batches per epoch, then 1 validation batch. 8 = mid-epoch 2 (after a
# step checkpoint), 12 = during validation of epoch 2, 20 = mid-epoch 4.
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [8, 12, 20])
def test_killed_training_resumes_to_the_same_result(tmp_path, uninterrupted, kill_at):
    resume = tmp_path / "resume"
    first = _run(tmp_path, tmp_path / "model", resume, kill_at, tmp_path / "log.json")
    assert first.returncode == -9, first.stderr[-2000:]  # it really was killed
    assert (resume / "state.json").exists() and not (tmp_path / "log.json").exists()
    second = _run(tmp_path, tmp_path / "model", resume, 0, tmp_path / "log.json")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stdout
    _same_result(uninterrupted, tmp_path)
    assert not resume.exists()  # a finished run leaves no resume state behind


@pytest.mark.slow
def test_two_ranks_killed_resume_together_to_the_same_result(tmp_path):
    """Every rank resumes (not only rank 0), each with its own RNG states (dropout draws differ per rank)."""
    whole = tmp_path / "whole"
    whole.mkdir()
    r = _run(whole, whole / "model", "-", 0, whole / "log.json", ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    resume = tmp_path / "resume"
    first = _run(tmp_path, tmp_path / "model", resume, 8, tmp_path / "log.json", ranks=2)
    assert first.returncode != 0 and not (tmp_path / "log.json").exists()
    assert {"state.json", "rng.rank0.safetensors", "rng.rank1.safetensors"} <= {p.name for p in resume.iterdir()}
    second = _run(tmp_path, tmp_path / "model", resume, 0, tmp_path / "log.json", ranks=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("resuming") == 2, second.stdout[-2000:]  # both ranks
    _same_result(whole, tmp_path)


def test_the_fingerprint_ignores_the_device():
    """Under torchrun each rank's device differs (cuda:0, cuda:1): all must find the same state."""
    from taste_pipeline import checkpoint
    from taste_pipeline.train_params import Train

    assert checkpoint.fingerprint(Train(device="cuda:0"), "taste") == checkpoint.fingerprint(Train(device="cuda:1"), "taste")


@pytest.mark.slow
def test_a_state_for_other_params_or_inputs_is_not_resumed(tmp_path):
    from taste_pipeline import checkpoint
    from taste_pipeline.train_params import Train

    first = _run(tmp_path, tmp_path / "model", tmp_path / "resume", 8, tmp_path / "log.json")
    assert first.returncode == -9
    info = json.loads((tmp_path / "resume" / "state.json").read_text())
    assert checkpoint.Resume(tmp_path / "resume", info["fingerprint"]).read() is not None
    assert checkpoint.Resume(tmp_path / "resume", "other").read() is None
    table = tmp_path / "t.parquet"
    table.write_bytes(b"x" * 100)
    fp = checkpoint.fingerprint(Train(), "taste", [table])
    assert fp != checkpoint.fingerprint(Train(lr=2e-3), "taste", [table]) != checkpoint.fingerprint(Train(), "text_only", [table])
    table.write_bytes(b"y" * 100)
    assert fp != checkpoint.fingerprint(Train(), "taste", [table])


STAGE_CHILD = r"""
import os, runpy, signal, sys
from taste_pipeline import tables
kill_after = int(sys.argv[1])
write = tables.TableWriter.write
count = {"n": 0}
def dying_write(self, rows, group=None):
    write(self, rows, group)
    count["n"] += 1
    if count["n"] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
tables.TableWriter.write = dying_write
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

REPO = Path(__file__).resolve().parents[1]


S3_CALL = "from taste_pipeline import s3; s3.tokenize_split(*sys.argv[:3], rows_per_group=2, partial_dir=sys.argv[3])"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["whisper", "s3"])
def test_killed_extraction_resumes_from_finished_row_groups(tiny_resampled, tmp_path, stage):
    import yaml

    from taste_pipeline import s3

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["whisper"]["rows_per_group"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    manifest = tiny_resampled / "manifest.parquet"
    if stage == "s3":
        s3.prepare_tokenizer(s3.STANDIN, tmp_path / "tok", manifest, 8, 0)

    def run(out, part, kill_after):
        if stage == "whisper":  # the stage script itself, as DVC runs it
            code, argv = STAGE_CHILD, [str(REPO / "stages" / "whisper.py"), str(manifest), str(out), "--partial-dir", str(part)]
        else:  # the s3 library call with small row groups (the stage's groups are 64 rows)
            code = STAGE_CHILD.replace('runpy.run_path(sys.argv[0], run_name="__main__")', S3_CALL)
            argv = [str(manifest), str(tmp_path / "tok"), str(out), str(part)]
        return subprocess.run([sys.executable, "-c", code, str(kill_after), *argv], cwd=tmp_path,
                              capture_output=True, text=True)

    whole = run(tmp_path / "whole.parquet", tmp_path / "part-whole", 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run(tmp_path / "t.parquet", tmp_path / "part", 2)
    assert killed.returncode == -9
    assert not (tmp_path / "t.parquet").exists()  # no half table where DVC would look
    assert sorted(p.name for p in (tmp_path / "part").glob("part-*.parquet")) == ["part-000000.parquet", "part-000001.parquet"]
    again = run(tmp_path / "t.parquet", tmp_path / "part", 0)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "t.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert not (tmp_path / "part").exists()
    if stage == "whisper":
        assert "resumed: 2 row groups" in again.stderr + again.stdout
