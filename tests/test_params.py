import pytest
import yaml

from taste_pipeline import params


def _write(tmp_path, doc):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_repo_params_load(monkeypatch):
    import pathlib
    root = pathlib.Path(__file__).parents[1] / "params.yaml"
    for section in params.SECTIONS:
        params.load(section, root)
    syn = params.load("synthesize", root)
    assert syn.train_utterances >= 1000 and syn.test_utterances >= 150
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
    ("synthesize", {"pause_prob": 2.0, "train_voices": ["en"], "test_voices": ["en-us"]}, "synthesize.pause_prob"),
])
def test_bad_values_name_the_param(tmp_path, section, doc, match):
    with pytest.raises(params.ParamError, match=match):
        params.load(section, _write(tmp_path, {section: doc}))
