"""dvc.yaml lists every project module a stage runs, so a code change re-runs what it affects."""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "taste_pipeline"


def project_imports(path: Path) -> set[Path]:
    """The package modules ``path`` imports, at any depth in the file (lazy imports inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y, inside the package
                base = [] if node.module is None else node.module.split(".")
                names = [".".join(base + [a.name]) for a in node.names] + ([node.module] if node.module else [])
            elif node.module and node.module.split(".")[0] == "taste_pipeline":
                rest = node.module.split(".")[1:]
                names = [".".join(rest + [a.name]) for a in node.names] + ([".".join(rest)] if rest else [])
        elif isinstance(node, ast.Import):
            names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("taste_pipeline.")]
        for name in names:
            f = PACKAGE / (name.replace(".", "/") + ".py")
            if f.exists():
                out.add(f)
    return out


def closure(script: Path) -> set[Path]:
    seen, todo = set(), [script]
    while todo:
        for f in project_imports(todo.pop()):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def stages():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, st in doc["stages"].items():
        body = st.get("do", st)
        yield name, body


@pytest.mark.parametrize("name,stage", list(stages()), ids=[n for n, _ in stages()])
def test_every_module_a_stage_runs_is_in_its_deps(name, stage):
    script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
    deps = {str(d) if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    assert script in deps, f"{name}: its script {script} is not in its deps"
    needed = {str(f.relative_to(ROOT)) for f in closure(ROOT / script)}
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them in deps"


def test_the_import_scan_sees_lazy_and_relative_imports(tmp_path):
    """The check itself: a function-level relative import counts, a third-party one does not."""
    mod = PACKAGE / "evaluate.py"
    found = {f.name for f in project_imports(mod)}
    assert {"train.py", "metrics.py", "tables.py", "text.py"} <= found
    script = tmp_path / "s.py"
    script.write_text("import torch\nfrom taste_pipeline import tables\ndef f():\n    from taste_pipeline.s3 import fetch\n")
    assert {f.name for f in project_imports(script)} == {"tables.py", "s3.py"}


@pytest.mark.parametrize("name,section", [("train", "variants"), ("finetune", "finetune")])
def test_a_training_stage_depends_on_its_own_variant_and_every_shared_train_param(name, section):
    """Not the whole ``train`` section, so adding or changing one variant re-runs only that one; but
    every shared param (a field of ``params.Train``), so a change to any of them re-runs them all."""
    from dataclasses import fields

    from taste_pipeline.params import Train

    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["do"]["params"]
    shared = {f"train.{f.name}" for f in fields(Train) if f.name not in ("variants", "finetune")}
    assert f"train.{section}.${{key}}" in listed
    assert "train" not in listed and f"train.{'finetune' if section == 'variants' else 'variants'}" not in listed
    assert sorted(shared - set(listed)) == [], "shared train params missing from the stage's params"
    unknown = {p for p in listed if p.startswith("train.")} - shared - {f"train.{section}.${{key}}"}
    assert not unknown, f"params that are not train fields: {sorted(unknown)}"
