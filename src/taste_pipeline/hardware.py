"""Devices and compute precision that fit the hardware: what ``auto`` means for ``*.device``,
``whisper.dtype``, ``s3.dtype`` and ``train.amp``.

bfloat16 halves the work only where the hardware computes it. A CPU without AVX512_BF16 or AMX (AVX2
only: most laptops and many servers) emulates it, and there a (4800x192)(192x768) matmul took 1,099 ms
in bfloat16 against 8.8 ms in float32. So ``auto`` is bfloat16 only where it is native (CUDA with bf16;
a CPU with AVX512_BF16 or AMX), float16 on CUDA without bf16, float32 elsewhere. Whatever ``auto``
chose is printed and recorded with the results (table metadata, DVCLive params), so every number says
how it was computed.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
CHOICES = (AUTO, *DTYPES)


def check_device(device: str, param: str) -> None:
    """A device param must be cpu, cuda, cuda:N or auto."""
    if device not in ("cpu", "cuda", AUTO) and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"{param}: {device!r} is not cpu, cuda, cuda:N or auto")


def resolve_device(device: str, param: str) -> str:
    """``auto`` is cuda when there is a GPU, else cpu; asking for cuda without one fails naming the param."""
    check_device(device, param)
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{param}: {device!r} asked for, but CUDA is not available")
    return device


def native_bfloat16(device: str) -> bool:
    """Does ``device`` compute bfloat16 in hardware (rather than emulate it)?"""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        # The instructions must be there and torch must be allowed to use them: ATEN_CPU_CAPABILITY=avx2
        # (how an AVX2-only machine is reproduced on a newer one) leaves bfloat16 emulated.
        allowed = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        return allowed and bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def auto_dtype(device: str) -> str:
    """The precision ``auto`` stands for on ``device``."""
    if native_bfloat16(device):
        return "bfloat16"
    return "float16" if torch.device(device).type == "cuda" else "float32"


def resolve(value: str, device: str, param: str) -> str:
    """A concrete dtype name for the param value ``value`` (``auto`` or a dtype name) on ``device``."""
    if value not in CHOICES:
        raise ValueError(f"{param}: {value!r} is not one of {list(CHOICES)}")
    return auto_dtype(device) if value == AUTO else value


def resolve_amp(value: bool | str, device: str) -> str:
    """``train.amp`` as the autocast dtype name, ``float32`` meaning no autocast.

    ``true`` keeps its old meaning (bfloat16 autocast), ``false`` turns autocast off.
    """
    if value is True:
        return "bfloat16"
    if value is False:
        return "float32"
    return resolve(value, device, "train.amp")


def cpu_description() -> str:
    """What a report should say about this CPU's precision support."""
    native = native_bfloat16("cpu")
    return (f"CPU path {torch.backends.cpu.get_cpu_capability()}, "
            f"bfloat16 {'native (AVX512_BF16/AMX)' if native else 'emulated (no AVX512_BF16/AMX)'}")


def describe(value: str, resolved: str, param: str, device: str) -> str:
    """One line for the log: what the param asked for and what it became."""
    if value == resolved:
        return f"{param}: {resolved} on {device}"
    why = cpu_description() if torch.device(device).type == "cpu" else f"CUDA bf16 native: {native_bfloat16(device)}"
    return f"{param}: {value} -> {resolved} on {device} ({why})"
