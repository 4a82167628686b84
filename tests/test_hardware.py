"""What ``auto`` means for devices and precision, on CPUs with and without native bfloat16."""

import pytest
import torch

from taste_pipeline import hardware, params, s3, train, train_params


@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-only"])
def native(request, monkeypatch):
    monkeypatch.setattr(hardware, "native_bfloat16", lambda device: request.param)
    return request.param


def test_auto_is_bfloat16_only_where_it_is_native(native):
    assert hardware.resolve("auto", "cpu", "whisper.dtype") == ("bfloat16" if native else "float32")
    assert hardware.resolve("auto", "cuda", "whisper.dtype") == ("bfloat16" if native else "float16")
    assert hardware.resolve_amp("auto", "cpu") == ("bfloat16" if native else "float32")


def test_explicit_values_win_over_the_hardware(native):
    assert hardware.resolve("float32", "cpu", "whisper.dtype") == "float32"
    assert hardware.resolve("bfloat16", "cpu", "whisper.dtype") == "bfloat16"
    assert hardware.resolve_amp(True, "cpu") == "bfloat16"  # the old meaning of `amp: true`
    assert hardware.resolve_amp(False, "cpu") == "float32"
    with pytest.raises(ValueError, match="train.amp"):
        hardware.resolve_amp("fp8", "cpu")


def test_autocast_follows_the_resolved_precision(native):
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 8)
    with train.autocast("cpu", "auto"):
        y = lin(x)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_s3_auto_keeps_float32_codes_everywhere(native):
    assert s3.resolve_dtype("auto") == "float32"
    assert s3.resolve_dtype("bfloat16") == "bfloat16"


def test_this_machine_is_described():
    line = hardware.cpu_description()
    assert torch.backends.cpu.get_cpu_capability() in line and "bfloat16" in line


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:a", "gpu"])
def test_bad_devices_name_the_param(device):
    with pytest.raises(ValueError, match="s3.device"):
        hardware.resolve_device(device, "s3.device")


def test_auto_device_without_a_gpu_is_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert hardware.resolve_device("auto", "train.device") == "cpu"
    with pytest.raises(ValueError, match="train.device.*CUDA is not available"):
        hardware.resolve_device("cuda", "train.device")


def test_precision_params_default_to_auto():
    assert params.Whisper().dtype == params.S3().dtype == train_params.Train().amp == "auto"


def test_torch_held_to_avx2_counts_as_no_native_bfloat16():
    """ATEN_CPU_CAPABILITY=avx2 reproduces an AVX2-only CPU: auto must then pick float32."""
    import os
    import subprocess
    import sys

    code = "from taste_pipeline import hardware; print(hardware.resolve('auto', 'cpu', 'x'), hardware.cpu_description())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2"),
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("float32 ") and "AVX2" in out and "emulated" in out
