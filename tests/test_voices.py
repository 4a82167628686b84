"""scripts/voices.py: within-speaker and nearest-train-speaker similarity from speaker tables."""

import numpy as np
import pytest

from conftest import load_script
from taste_pipeline import tables


@pytest.fixture(scope="module")
def voices():
    return load_script("scripts/voices.py")


def _table(path, speakers: dict[str, np.ndarray]):
    ids, embs = [], []
    for name, e in speakers.items():
        for i, row in enumerate(e):
            ids.append(f"{name}-1-{i:04d}")
            embs.append(row.astype(np.float32).tolist())
    tables.write_table(path, {"utt_id": ids, "emb": embs}, tables.speaker_schema(3),
                       {"speaker.source": "test", "speaker.width": "3"})


def test_similarities_on_known_embeddings(voices, tmp_path):
    # Speaker 1: two unit vectors 90 degrees apart -> within = cos 90 = 0; with speaker 2's one vector
    # along x the mean cosine is (1 + 0) / 2.
    x, y, z = np.eye(3)
    _table(tmp_path / "s.parquet", {"1": np.stack([x, y]), "2": np.stack([x, x]), "3": np.stack([z, z])})
    got = voices.by_speaker(tmp_path / "s.parquet")
    assert sorted(got) == ["1", "2", "3"]
    assert voices.within(got["1"]) == pytest.approx(0.0)
    assert voices.within(got["2"]) == pytest.approx(1.0)
    assert voices.between(got["1"], got["2"]) == pytest.approx(0.5)
    assert voices.between(got["1"], got["3"]) == pytest.approx(0.0)
    # embeddings of any length are compared as directions
    _table(tmp_path / "t.parquet", {"4": np.stack([3 * x, 0.5 * x])})
    assert voices.within(voices.by_speaker(tmp_path / "t.parquet")["4"]) == pytest.approx(1.0)
