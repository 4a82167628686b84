"""torchrun with 2 CPU ranks writes the same extraction tables as one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _torchrun(n, args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


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
    two = _torchrun(2, args(tmp_path / "two.parquet", tmp_path / "p2"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{stage} tiny-train rank 1/2" in two.stderr  # both ranks really worked
    assert (tmp_path / "two.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
    assert not (tmp_path / "p2").exists()
