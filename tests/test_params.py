import pytest
import yaml

from taste_pipeline import params, train_params, vocoder

SECTIONS = {**params.SECTIONS, **train_params.SECTIONS, **vocoder.SECTIONS}


def load(section, path):
    """Any section, from whichever module holds it (as the stage scripts do)."""
    if section in vocoder.SECTIONS:
        return vocoder.load_params(path)
    return (train_params if section in train_params.SECTIONS else params).load(section, path)


def _write(tmp_path, doc):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_repo_params_load(monkeypatch):
    import pathlib
    root = pathlib.Path(__file__).parents[1] / "params.yaml"
    assert set(SECTIONS) == set(yaml.safe_load(root.read_text()))
    for section in SECTIONS:
        load(section, root)
    syn = load("synthesize", root)
    assert syn.train_utterances >= 250 and syn.test_utterances >= 150
    assert len(syn.train_voices) >= 6 and len(syn.test_voices) >= 2


@pytest.mark.parametrize("section,doc,match", [
    ("whisper", {"batch_size": -2}, "whisper.batch_size"),
    ("whisper", {"mid_layer": "two"}, "whisper.mid_layer"),
    ("whisper", {"device": "tpu"}, "whisper.device"),
    ("whisper", {"windows_s": [20, 10]}, "whisper.windows_s"),
    ("whisper", {"windows_s": [10, 40]}, "whisper.windows_s"),
    ("whisper", {"windows_s": 10}, "whisper.windows_s"),
    ("whisper", {"dtype": "fp8"}, "whisper.dtype"),
    ("whisper", {"mdoel": "x"}, r"whisper: unknown key\(s\) \['mdoel'\]"),
    ("text", {"case": "upper"}, "text.case"),
    ("data", {"splits": ["a"], "train_split": "b", "test_split": "a"}, "data.train_split"),
    ("resample", {"strict": "yes"}, "resample.strict"),
    ("resample", {"silence_dbfs": 3}, "resample.silence_dbfs"),
    ("train", {"lr": -0.001}, "train.lr"),
    ("train", {"epochs": 0}, "train.epochs"),
    ("train", {"checkpoint_steps": -1}, "train.checkpoint_steps"),
    ("s3", {"dtype": "int8"}, "s3.dtype"),
    ("s3", {"device": "gpu"}, "s3.device"),
    ("train", {"amp": "fp8"}, "train.amp"),
    ("train", {"amp": 1}, "train.amp"),
    ("train", {"device": "cuda:x"}, "train.device"),
    ("vocoder", {"kernel": 4}, "vocoder.kernel"),
    ("evaluate", {"asr_window_s": 7}, "evaluate.asr_window_s"),
    ("vocoder", {"epochs": 0}, "vocoder.epochs"),
    ("evaluate", {"listen_utterances": 40, "rebuild_utterances": 32}, "evaluate.listen_utterances"),
    ("synthesize", {"pause_prob": 2.0, "train_voices": ["en"], "test_voices": ["en-us"]}, "synthesize.pause_prob"),
])
def test_bad_values_name_the_param(tmp_path, section, doc, match):
    with pytest.raises(params.ParamError, match=match):
        load(section, _write(tmp_path, {section: doc}))


@pytest.mark.slow
def test_stage_scripts_name_the_param_for_bad_inputs(tmp_path):
    """A missing split folder and a layer the encoder lacks: the stage fails at once naming the param."""
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow as pa

    from taste_pipeline import tables

    repo = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["whisper"]["mid_layer"] = 9  # tiny.en has 4 encoder layers
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))

    def stage(name, *args):
        return subprocess.run([sys.executable, str(repo / "stages" / f"{name}.py"), *map(str, args)],
                              cwd=tmp_path, capture_output=True, text=True)

    r = stage("resample", tmp_path, "no-split", tmp_path / "out")
    assert r.returncode != 0 and "data.root" in r.stderr and "no-split" in r.stderr
    (tmp_path / "m").mkdir()
    tables.write_table(tmp_path / "m" / "manifest.parquet", pa.Table.from_pylist([], schema=tables.MANIFEST),
                       tables.MANIFEST)
    r = stage("whisper", tmp_path / "m" / "manifest.parquet", tmp_path / "w.parquet")
    assert r.returncode != 0 and "whisper.mid_layer: 9" in r.stderr
    assert not (tmp_path / "w.parquet").exists()


def test_defaults_in_code_equal_params_yaml():
    """One source of truth: every param's dataclass default is params.yaml's value (the embedded corpus's
    voice lists excepted: they are data, and the code refuses to run without them)."""
    import dataclasses
    import pathlib

    doc = yaml.safe_load((pathlib.Path(__file__).parents[1] / "params.yaml").read_text())
    for section, cls in SECTIONS.items():
        default = cls()
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, section
        for key, value in doc[section].items():
            if (section, key) in {("synthesize", "train_voices"), ("synthesize", "test_voices")}:
                continue
            assert getattr(default, key) == value, f"{section}.{key}: code {getattr(default, key)!r}, params.yaml {value!r}"


def test_train_params_build_the_model_config_field_by_field():
    import dataclasses

    from taste_pipeline.model import ModelConfig
    from taste_pipeline.train_params import ModelArgs

    p = train_params.Train(d_model=64, n_layers=2, agg_layers=3, squeeze="rvq", unit_alignment="durations")
    cfg = ModelConfig.build(p, vocab_size=8, d_query=32, d_audio=32)
    for f in dataclasses.fields(ModelArgs):
        assert getattr(cfg, f.name) == getattr(p, f.name)


TWO = {"taste": {"speech": "tokens"}, "text_only": {"speech": "none"}}


@pytest.mark.parametrize("doc,match", [
    ({"variants": {"taste": {"speech": "tokens"}}}, "train.variants: needs a variant with speech: none"),
    ({"variants": {"text_only": {"speech": "none"}}}, "train.variants: needs a variant with speech: tokens"),
    ({"variants": {**TWO, "big": {"d_model": "x"}}}, "train.variants.big.d_model"),
    ({"variants": {**TWO, "odd": {"n_heads": 5}}}, "train.variants.odd: train.d_model: 192 is not divisible by train.n_heads 5"),
    ({"variants": {**TWO, "odd": {"speech": "words"}}}, r"train.variants.odd: train.speech: 'words' is not one of"),
    ({"variants": {**TWO, "odd": {"speech": "frames", "squeeze": "rvq"}}}, "train.variants.odd: train.squeeze: 'rvq'"),
    ({"finetune": {"ft": {"init": "nope"}}}, "train.finetune.ft.init: 'nope'"),
    ({"finetune": {"ft": {"model": "taste_rvq", "init": "taste"}}}, "train.finetune.ft: model: 'taste_rvq' is gone"),
    ({"finetune": {"taste": {"init": "text_only"}}}, "used twice"),
])
def test_variants_are_checked_naming_the_param(tmp_path, doc, match):
    with pytest.raises(params.ParamError, match=match):
        train_params.load("train", _write(tmp_path, {"train": doc}))


def test_a_variant_overrides_only_its_own_params(tmp_path):
    p = train_params.load("train", _write(tmp_path, {"train": {"lr": 0.002, "finetune": {
        "ft": {"squeeze": "rvq", "init": "text_only", "lr": 0.0005, "epochs": 3}}}}))
    own, init = p.variant("ft")
    assert (own.lr, own.epochs, own.speech, own.squeeze, init) == (0.0005, 3, "tokens", "rvq", "text_only")
    base, init = p.variant("text_only")
    assert (base.lr, base.epochs, base.speech, base.squeeze, init) == (0.002, p.epochs, "none", "none", None)


def test_every_dvc_exp_run_override_the_readme_shows_applies_to_params_yaml(tmp_path):
    """The README's `dvc exp run -S ...` lines go through DVC's own override parser (Hydra: a key that
    is not in params.yaml needs a leading +) and give params the stages load."""
    import re
    import shutil
    from pathlib import Path

    from dvc.utils.hydra import apply_overrides

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    commands = re.findall(r"dvc exp run((?: -S (?:'[^']*'|[^\s`']+))+)", readme)
    assert commands
    for cmd in commands:
        overrides = [a.strip("'") for a in re.findall(r"-S ('[^']*'|[^\s`']+)", cmd)]
        path = tmp_path / "params.yaml"
        shutil.copy(root / "params.yaml", path)
        apply_overrides(str(path), overrides)
        for section in ("train", "evaluate"):
            train_params.load(section, path)
