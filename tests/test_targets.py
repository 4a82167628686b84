import numpy as np

from taste_pipeline import targets


def test_run_length_and_chance():
    assert targets.mean_run_length([np.array([1, 1, 2, 2, 2, 3]), np.array([4])]) == 7 / 4
    assert abs(targets.chance_agreement([np.array([0, 0, 1, 1])]) - 0.5) < 1e-12


def test_word_timings_pair_frames_at_the_same_place_in_each_word():
    a = (np.array([0.0, 0.4]), np.array([0.2, 0.8]))  # frames 0-9 and 20-39
    b = (np.array([0.1, 0.3]), np.array([0.2, 0.5]))  # frames 5-9 and 15-24: half as long
    ia, ib = targets.word_pairs(a, b, 50, 30)
    assert len(ia) == 30 and set(ia.tolist()) == set(range(10)) | set(range(20, 40))
    assert ib[ia == 0][0] == 5 and ib[ia == 39][0] == 24 and (np.diff(ib) >= 0).all()
    u = np.arange(50) % 7
    assert targets.agreement([(u, u, np.arange(50), np.arange(50))]) == 1.0


def test_dtw_follows_a_stretched_copy():
    rng = np.random.default_rng(0)
    fa = rng.standard_normal((20, 8))
    fb = np.repeat(fa, 2, axis=0)  # every frame twice
    ia, ib = targets.dtw_pairs(fa, fb)
    assert ia[0] == 0 and ib[0] == 0 and ia[-1] == 19 and ib[-1] == 39
    assert (ia == ib // 2).all()
