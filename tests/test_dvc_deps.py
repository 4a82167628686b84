"""dvc.yaml lists every project module a stage runs, so a code change re-runs what it affects."""

import ast
import re
import subprocess
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
    listed = {d for d in deps if d.startswith("src/")}
    extra = sorted(listed - needed)
    assert not extra, f"dvc.yaml stage {name!r} lists {extra}, which it never runs: a change there would re-run it"


def _dvc(repo: Path, *args: str) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module,expected", [
    ("model.py", {"train", "finetune", "tokenize", "evaluate"}),
    ("corpus.py", {"synthesize"}),
])
def test_dvc_re_runs_only_the_stages_that_run_a_touched_module(tmp_path, module, expected):
    """Through DVC itself: in a copy of the pipeline whose data are empty stand-ins, committed so that
    the lock file matches, an edit to ``module`` makes ``dvc status`` report exactly the stages that run it."""
    import json
    import shutil
    import subprocess

    from dvc.repo import Repo

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("src", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for stage in Repo(str(repo)).index.stages:
        for entry in [*stage.deps, *stage.outs]:
            p = repo / entry.def_path
            if p.exists():
                continue
            if "." in p.name:  # a table; anything else is a folder
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("")
            else:
                p.mkdir(parents=True)
                (p / "stand-in").write_text("")
    _dvc(repo, "commit", "-f", "-q")
    assert json.loads(_dvc(repo, "status", "--json") or "{}") == {}
    with open(repo / "src" / "taste_pipeline" / module, "a") as f:
        f.write("\n# an edit\n")
    status = json.loads(_dvc(repo, "status", "--json"))
    assert all(f"src/taste_pipeline/{module}" in json.dumps(v) for v in status.values()), status
    assert {name.split("@")[0] for name in status} == expected, f"an edit to {module} re-runs {sorted(status)}"


@pytest.mark.parametrize("name,section", [("train", "variants"), ("finetune", "finetune")])
def test_a_training_stage_depends_on_its_own_variant_and_every_shared_train_param(name, section):
    """Not the whole ``train`` section, so adding or changing one variant re-runs only that one; but
    every shared param (a field of ``train_params.Train``), so a change to any of them re-runs them all."""
    from dataclasses import fields

    from taste_pipeline.train_params import Train

    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["do"]["params"]
    shared = {f"train.{f.name}" for f in fields(Train) if f.name not in ("variants", "finetune")}
    assert f"train.{section}.${{key}}" in listed
    assert "train" not in listed and f"train.{'finetune' if section == 'variants' else 'variants'}" not in listed
    assert sorted(shared - set(listed)) == [], "shared train params missing from the stage's params"
    unknown = {p for p in listed if p.startswith("train.")} - shared - {f"train.{section}.${{key}}"}
    assert not unknown, f"params that are not train fields: {sorted(unknown)}"


def test_the_package_has_no_import_cycle():
    """A module never imports, however indirectly, a module that imports it back (lazy imports count)."""
    modules = sorted(PACKAGE.glob("*.py"))
    for module in modules:
        assert module not in closure(module), f"{module.name} imports itself through {sorted(f.name for f in closure(module))}"


def test_no_cached_dvc_out_is_tracked_by_git():
    """A cached out that git also tracks fails its stage on a fresh clone ("already tracked by SCM")."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    clashes = []
    for name, stage in stages():
        for out in stage.get("outs", []):
            path, opts = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if (opts or {}).get("cache", True) is False:
                continue  # git keeps these (metrics, plots)
            pattern = re.compile(re.sub(r"\\\$\\\{[^}]*\\\}", "[^/]+", re.escape(path)) + "(/.*)?")
            # DVC writes the .gitignore files beside its outs; they belong in git
            clashes += [f"{name}: {f}" for f in tracked if pattern.fullmatch(f) and not f.endswith("/.gitignore")]
    assert not clashes, clashes
