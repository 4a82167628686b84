"""The unit-to-mel decoder and Griffin-Lim: shapes, padding, determinism, checkpoints."""

import numpy as np
import pytest
import torch

from taste_pipeline import vocoder as V


def _args(**kw):
    return V.VocoderArgs(vocab_size=16, speaker_dim=8, d_model=16, n_layers=2, kernel=3, **kw)


def test_shapes_and_a_batch_gives_each_utterance_what_it_gets_alone():
    torch.manual_seed(0)
    m = V.UnitToMel(_args()).eval()
    units = torch.randint(0, 16, (2, 7))
    lengths = torch.tensor([7, 4])
    spk = torch.randn(2, 8)
    mel, mel_len = m(units, lengths, spk)
    assert mel.shape == (2, 7 * V.UPSAMPLE, V.MEL["n_mels"]) and mel_len.tolist() == [14, 8]
    alone, _ = m(units[1:, :4], lengths[1:], spk[1:])
    torch.testing.assert_close(mel[1, :8], alone[0], rtol=1e-5, atol=1e-5)


def test_the_target_is_on_the_unit_clock():
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1  # 1 s = 50 units
    assert V.log_mel(audio, 50).shape == (100, V.MEL["n_mels"])
    short = V.log_mel(audio[:3200], 50)  # 0.2 s of audio on a 1 s clock: the rest is the silence floor
    assert short.shape == (100, V.MEL["n_mels"]) and np.all(short[30:] == np.float32(np.log(V.LOG_FLOOR)))


def test_griffin_lim_is_deterministic_and_gives_the_mel_length():
    audio = np.sin(2 * np.pi * 220 * np.arange(8000) / 16000).astype(np.float32) * 0.5
    mel = V.log_mel(audio, 25)
    gl = V.GriffinLim(iters=4)
    a, b = gl(mel), gl(mel)
    assert np.array_equal(a, b) and len(a) == 50 * V.MEL["hop_length"]
    assert np.abs(a).max() <= 1.0
    # The rebuilt tone is still a 220 Hz tone.
    spec = np.abs(np.fft.rfft(a))
    assert abs(np.argmax(spec) * 16000 / len(a) - 220) < 20


def _dataset(n=6, seed=0):
    rng = np.random.default_rng(seed)
    units = [rng.integers(0, 16, rng.integers(5, 12)) for _ in range(n)]
    mels = [rng.standard_normal((len(u) * V.UPSAMPLE, V.MEL["n_mels"])).astype(np.float32) for u in units]
    return V.UnitMelSet(units, mels, rng.standard_normal((n, 8)).astype(np.float32))


def test_training_is_deterministic_and_saves_a_loadable_checkpoint(tmp_path):
    p = V.Vocoder(d_model=16, n_layers=2, kernel=3, epochs=2, batch_size=2)
    info = {"vocab_size": 16, "targets": "t", "speaker": "s"}
    h1 = V.train(_dataset(), info, p, 3, tmp_path / "a")
    h2 = V.train(_dataset(), info, p, 3, tmp_path / "b")
    h3 = V.train(_dataset(), info, p, 4, tmp_path / "c")
    assert h1 == h2 and h1 != h3 and len(h1) == 2
    a, _ = V.load(tmp_path / "a")
    b, _ = V.load(tmp_path / "b")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    r = V.Rebuilder(tmp_path / "a", griffin_lim_iters=2)
    wav = r(np.array([1, 2, 3, 4]), np.zeros(8, np.float32))
    assert wav.dtype == np.float32 and len(wav) == 4 * 320
    # One unit (a free-running decoder may say END at once) is 20 ms of audio, not a failure.
    assert len(r(np.array([5]), np.zeros(8, np.float32))) == 320
    assert len(r(np.zeros(0, np.int64), np.zeros(8, np.float32))) == 0


def test_a_checkpoint_for_another_mel_is_refused(tmp_path):
    import json

    V.save(V.UnitToMel(_args()), tmp_path, {})
    cfg = json.loads((tmp_path / V.CONFIG_FILE).read_text())
    cfg["mel"] = {**cfg["mel"], "hop_length": 256}
    (tmp_path / V.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="re-run the vocoder stage"):
        V.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the vocoder stage"):
        V.load(tmp_path / "none")
