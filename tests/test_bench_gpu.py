"""bench/gpu.py's FLOP count, against torch's own counter on a small Whisper encoder."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_encoder_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    bench = load_bench()
    cfg = WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
                        max_source_positions=1500)
    cfg._attn_implementation = "eager"  # the counter does not see CPU SDPA kernels; eager attention is matmuls
    enc = WhisperEncoder(cfg).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        enc(torch.randn(1, 80, 3000))
    counted = counter.get_total_flops()
    assert abs(bench.encoder_flops(cfg, 1500) - counted) / counted < 0.02, (bench.encoder_flops(cfg, 1500), counted)
