import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from taste_pipeline import audio, tables


def test_manifest_matches_transcripts(tiny_corpus, tiny_resampled):
    manifest = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()
    expected = {}
    for trans in (tiny_corpus / "tiny-train").rglob("*.trans.txt"):
        spk, chap = trans.name[: -len(".trans.txt")].split("-")
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            expected[utt] = (spk, chap, text)
    assert {r["utt_id"]: (r["speaker_id"], r["chapter_id"], r["text"]) for r in manifest} == expected
    assert [r["utt_id"] for r in manifest] == sorted(expected)
    assert tables.read_rejects(tiny_resampled / "rejects.parquet").num_rows == 0


def test_resampled_audio_is_16k_mono_with_the_right_length(tiny_corpus, tiny_resampled):
    for r in tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist():
        src = next((tiny_corpus / "tiny-train").rglob(f"{r['utt_id']}.flac"))
        n_src = sf.info(src).frames
        out = audio.load_utterance(tiny_resampled, r)
        assert out.ndim == 1 and sf.info(tiny_resampled / r["audio_path"]).samplerate == 16000
        assert len(out) == r["num_samples"] == math.ceil(n_src * 16000 / 22050)
        assert r["duration"] == pytest.approx(r["num_samples"] / 16000)


def _tone(rate, seconds, freq=440.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _write_chapter(root, spk, chap, items):
    """items: {index: (audio or None or bytes, samplerate, subtype, ext, text or None)}"""
    d = root / spk / chap
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for idx, (data, rate, subtype, ext, text) in items.items():
        utt = f"{spk}-{chap}-{idx:04d}"
        if isinstance(data, bytes):
            (d / f"{utt}{ext}").write_bytes(data)
        elif data is not None:
            sf.write(d / f"{utt}{ext}", data, rate, subtype=subtype)
        if text is not None:
            lines.append(f"{utt} {text}")
    (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")


def _flac_bytes(x, rate):
    import io

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture()
def odd_split(tmp_path):
    """Odd but valid inputs (0-2, 8-9, 13-14) and bad ones (3-7, 10-12), in LibriSpeech layout."""
    root = tmp_path / "odd"
    _write_chapter(root, "1", "10", {
        0: (_tone(44100, 1.0, channels=2), 44100, "PCM_24", ".wav", "STEREO TWENTY FOUR BIT"),
        1: (_tone(8000, 1.0), 8000, "PCM_16", ".flac", "EIGHT KILOHERTZ"),
        2: (_tone(16000, 60.0), 16000, "PCM_16", ".flac", "A SIXTY SECOND UTTERANCE"),
        3: (b"", 0, None, ".flac", "ZERO BYTES"),
        4: (b"this is not audio at all\n" * 10, 0, None, ".flac", "TEXT FILE"),
        5: (_tone(16000, 0.5), 16000, "PCM_16", ".flac", None),  # audio without a transcript line
        6: (None, 0, None, ".flac", "TRANSCRIPT WITHOUT AUDIO"),
        7: (_tone(16000, 0.5), 16000, "PCM_16", ".flac", ""),  # empty transcript
        8: (_tone(16000, 1.5, freq=300), 16000, "PCM_16", ".flac", "NAÏVE CAFÉ — ÜBER SPRÖDE"),  # non-ASCII
        9: (_tone(22050, 2.0) * 0.002, 22050, "PCM_16", ".flac", "VERY QUIET BUT NOT SILENT"),  # -60 dBFS + 6 dB
        10: (_flac_bytes(_tone(16000, 3.0), 16000)[:6000], 0, None, ".flac", "TRUNCATED FLAC"),
        11: (np.zeros(16000), 16000, "PCM_16", ".flac", "PURE SILENCE"),
        13: (_tone(44100, 1.25), 44100, "PCM_24", ".flac", "FORTY FOUR POINT ONE KILOHERTZ TWENTY FOUR BIT"),
        14: (_tone(16000, 0.75, channels=2), 16000, "PCM_16", ".flac", "STEREO AT SIXTEEN KILOHERTZ"),
    })
    (root / "1" / "10" / "1-10-0012.flac").symlink_to(root / "1" / "10" / "gone.flac")  # points nowhere
    with open(root / "1" / "10" / "1-10.trans.txt", "a") as f:
        f.write("1-10-0012 A LINK TO NOTHING\n")
    return root


GOOD = {"1-10-0000", "1-10-0001", "1-10-0002", "1-10-0008", "1-10-0009", "1-10-0013", "1-10-0014"}


def test_any_rate_and_channel_count_becomes_16k_mono(odd_split, tmp_path):
    out = tmp_path / "out"
    kept, rejected = audio.resample_split(odd_split, out)
    rows = {r["utt_id"]: r for r in tables.read_manifest(out / "manifest.parquet").to_pylist()}
    assert set(rows) == GOOD and (kept, rejected) == (7, 8)
    assert rows["1-10-0000"]["num_samples"] == 16000  # 1 s of 44.1 kHz stereo
    assert rows["1-10-0001"]["num_samples"] == 16000  # 1 s of 8 kHz
    assert rows["1-10-0002"]["duration"] == pytest.approx(60.0)  # over 30 s: kept whole
    assert rows["1-10-0008"]["text"] == "NAÏVE CAFÉ — ÜBER SPRÖDE"
    assert rows["1-10-0009"]["num_samples"] == 32000
    assert rows["1-10-0013"]["num_samples"] == 20000  # 1.25 s of 44.1 kHz 24-bit
    assert rows["1-10-0014"]["num_samples"] == 12000  # 0.75 s of 16 kHz stereo
    x = audio.load_utterance(out, rows["1-10-0000"])
    spectrum = np.abs(np.fft.rfft(x))
    assert np.argmax(spectrum) * 16000 / len(x) == pytest.approx(440, abs=2)  # the tone survives


def test_every_bad_input_is_a_reject_with_a_reason(odd_split, tmp_path):
    out = tmp_path / "out"
    audio.resample_split(odd_split, out)
    rejects = {r["utt_id"]: r for r in tables.read_rejects(out / "rejects.parquet").to_pylist()}
    assert set(rejects) == {f"1-10-{i:04d}" for i in (3, 4, 5, 6, 7, 10, 11, 12)}
    assert "empty file" in rejects["1-10-0003"]["reason"]
    assert "not readable as audio" in rejects["1-10-0004"]["reason"]
    assert "no transcript line" in rejects["1-10-0005"]["reason"]
    assert "no audio file" in rejects["1-10-0006"]["reason"]
    assert "empty transcript" in rejects["1-10-0007"]["reason"]
    assert "truncated" in rejects["1-10-0010"]["reason"]
    assert "silent audio" in rejects["1-10-0011"]["reason"] and "resample.silence_dbfs" in rejects["1-10-0011"]["reason"]
    assert "symbolic link to a missing file" in rejects["1-10-0012"]["reason"]
    for r in rejects.values():
        assert r["path"].startswith(str(odd_split)) and r["reason"].startswith(str(odd_split))  # names a file
    assert pq.read_table(out / "manifest.parquet").num_rows == len(GOOD)


def test_silence_can_be_kept_on_request(odd_split, tmp_path):
    audio.resample_split(odd_split, tmp_path / "out", silence_dbfs=None)
    ids = tables.read_manifest(tmp_path / "out" / "manifest.parquet").column("utt_id").to_pylist()
    assert "1-10-0011" in ids


def test_odd_inputs_come_through_whisper_with_the_right_length(odd_split, tmp_path):
    from taste_pipeline import params, whisper

    audio.resample_split(odd_split, tmp_path / "out")
    manifest = tables.read_manifest(tmp_path / "out" / "manifest.parquet")
    whisper.extract_split(tmp_path / "out" / "manifest.parquet", tmp_path / "w.parquet",
                          params.Whisper(windows_s=[10, 20, 30], dtype="bfloat16", rows_per_group=2))
    w = tables.read_whisper(tmp_path / "w.parquet")
    assert w.column("utt_id").to_pylist() == manifest.column("utt_id").to_pylist()
    for i, n in enumerate(manifest.column("num_samples").to_pylist()):
        assert tables.row_matrix(w, "last", i).shape == (tables.frames_for(n), 384)
        assert np.isfinite(tables.row_matrix(w, "mid", i)).all()


def test_strict_mode_fails_on_the_first_bad_file(odd_split, tmp_path):
    with pytest.raises(audio.BadInput, match=r"1-10-0003\.flac: empty file"):
        audio.resample_split(odd_split, tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_missing_split_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        audio.resample_split(tmp_path / "nope", tmp_path / "out")


def test_missing_audio_is_named_by_utterance(tiny_resampled):
    row = tables.read_manifest(tiny_resampled / "manifest.parquet").to_pylist()[0]
    with pytest.raises(FileNotFoundError, match=row["utt_id"]):
        audio.load_utterance(tiny_resampled, dict(row, audio_path="audio/gone.flac"))


@pytest.fixture()
def nobody_split(tmp_path):
    """Inputs nobody made for us: non-finite float audio, float audio over full scale, a transcript
    line that is not UTF-8, two different lines for one utterance, the same line twice."""
    d = tmp_path / "nobody" / "2" / "20"
    d.mkdir(parents=True)
    nan, inf, loud = _tone(16000, 1.0), _tone(16000, 1.0), _tone(16000, 1.0) * 3.6  # loud peaks at 1.8
    nan[100:110], inf[5000] = np.nan, np.inf
    for i, x in enumerate([nan, inf, loud, _tone(16000, 1.0), _tone(16000, 1.0), _tone(16000, 1.0), _tone(16000, 1.0)]):
        sf.write(d / f"2-20-{i:04d}.wav", x, 16000, subtype="FLOAT")
    (d / "2-20.trans.txt").write_bytes(
        b"2-20-0000 NOT A NUMBER\n2-20-0001 INFINITY\n2-20-0002 TOO LOUD\n2-20-0003 CAF\xc9 AU LAIT\n"
        b"2-20-0004 ONE TEXT\n2-20-0004 ANOTHER TEXT\n2-20-0005 SAID TWICE\n2-20-0005 SAID TWICE\n2-20-0006 FINE\n")
    return tmp_path / "nobody"


def test_inputs_nobody_made_for_us_are_rejected_or_repaired_by_name(nobody_split, tmp_path):
    out = tmp_path / "out"
    kept, rejected = audio.resample_split(nobody_split, out)
    rejects = {r["utt_id"]: r for r in tables.read_rejects(out / "rejects.parquet").to_pylist()}
    rows = {r["utt_id"]: r for r in tables.read_manifest(out / "manifest.parquet").to_pylist()}
    assert set(rejects) == {"2-20-0000", "2-20-0001", "2-20-0003", "2-20-0004"} and (kept, rejected) == (3, 4)
    assert "2-20-0000.wav: 10 samples are NaN or infinite" in rejects["2-20-0000"]["reason"]
    assert "2-20-0001.wav: 1 samples are NaN or infinite" in rejects["2-20-0001"]["reason"]
    assert "2-20.trans.txt:4: transcript is not UTF-8 (byte 0xc9" in rejects["2-20-0003"]["reason"]
    assert "2-20.trans.txt:6: a second transcript line" in rejects["2-20-0004"]["reason"]
    assert "which is right is unknown" in rejects["2-20-0004"]["reason"]
    assert rows["2-20-0005"]["text"] == "SAID TWICE" and rows["2-20-0006"]["text"] == "FINE"
    repairs = tables.read_repairs(out / "repairs.parquet").to_pylist()
    assert [r["utt_id"] for r in repairs] == ["2-20-0002"] and "peak 1.800 above full scale" in repairs[0]["repair"]
    x = audio.load_utterance(out, rows["2-20-0002"])
    assert np.abs(x).max() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(x, _tone(16000, 1.0) * 2, atol=2e-4)  # scaled, not clipped: still a sine


def test_transcripts_as_editors_leave_them_keep_their_utterances(tmp_path):
    """A UTF-8 byte-order mark before the first id and a tab (or several blanks) between id and text are
    read as meant: every utterance is kept with its text, none rejected as having no transcript line."""
    d = tmp_path / "edited" / "3" / "30"
    d.mkdir(parents=True)
    for i in range(3):
        sf.write(d / f"3-30-{i:04d}.wav", _tone(16000, 0.5), 16000)
    (d / "3-30.trans.txt").write_bytes(b"\xef\xbb\xbf3-30-0000 FIRST LINE\r\n3-30-0001\tTABBED TEXT\r\n"
                                       b"3-30-0002   MANY  BLANKS\r\n")
    out = tmp_path / "out"
    assert audio.resample_split(tmp_path / "edited", out) == (3, 0)
    texts = {r["utt_id"]: r["text"] for r in tables.read_manifest(out / "manifest.parquet").to_pylist()}
    assert texts == {"3-30-0000": "FIRST LINE", "3-30-0001": "TABBED TEXT", "3-30-0002": "MANY  BLANKS"}


def test_strict_mode_stops_at_a_non_finite_file_and_at_a_repair(nobody_split, tmp_path):
    with pytest.raises(audio.BadInput, match=r"2-20-0000\.wav: 10 samples are NaN"):
        audio.resample_split(nobody_split, tmp_path / "out", strict=True)
    d = nobody_split / "2" / "20"
    for i in (0, 1, 3, 4):  # leave the loud one first in line
        (d / f"2-20-{i:04d}.wav").unlink()
    (d / "2-20.trans.txt").write_text("2-20-0002 TOO LOUD\n2-20-0005 SAID TWICE\n2-20-0006 FINE\n")
    with pytest.raises(audio.BadInput, match=r"2-20-0002\.wav: peak 1.800 above full scale"):
        audio.resample_split(nobody_split, tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_lhotse_manifests_of_the_corpus_give_the_same_tables(tiny_corpus, tiny_resampled, tmp_path):
    """lhotse's own LibriSpeech recipe over the tiny corpus, read with data.format lhotse, gives the
    LibriSpeech-layout path's manifest, rejects, repairs and audio, byte for byte."""
    from lhotse.recipes import prepare_librispeech

    prepare_librispeech(tiny_corpus, dataset_parts=["tiny-train"], output_dir=tmp_path / "manifests")
    out = tmp_path / "out"
    kept, rejected = audio.resample_split(tmp_path / "manifests" / "tiny-train", out, fmt="lhotse")
    assert rejected == 0
    for name in ("manifest.parquet", "rejects.parquet", "repairs.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_resampled / name)), name
    for r in tables.read_manifest(out / "manifest.parquet").to_pylist():
        assert (out / r["audio_path"]).read_bytes() == (tiny_resampled / r["audio_path"]).read_bytes()


def _lhotse_split(root, recordings, supervisions, split="x"):
    from lhotse import RecordingSet, SupervisionSet

    root.mkdir(parents=True, exist_ok=True)
    RecordingSet.from_recordings(recordings).to_file(root / f"c_recordings_{split}.jsonl.gz")
    with SupervisionSet.open_writer(root / f"c_supervisions_{split}.jsonl.gz") as w:
        for s in supervisions:  # written one by one: a set would refuse the duplicate ids under test
            w.write(s)
    return root / split


def test_lhotse_segments_channels_and_the_same_rules(tmp_path):
    """Segments inside a long recording, a chosen channel, a stereo mix; NaN audio, a missing recording,
    no speaker, conflicting duplicates and a recording nobody uses are rejects naming the file."""
    from lhotse import Recording, SupervisionSegment as S

    rate = 22050
    left, right = _tone(rate, 6.0, freq=300), _tone(rate, 6.0, freq=700)
    sf.write(tmp_path / "long.wav", np.stack([left, right], axis=1), rate, subtype="PCM_16")
    bad = _tone(16000, 1.0)
    bad[3] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    sf.write(tmp_path / "unused.wav", _tone(16000, 1.0), 16000, subtype="PCM_16")
    long, nan, unused = (Recording.from_file(tmp_path / f"{n}.wav", recording_id=n) for n in ("long", "nan", "unused"))
    sups = [S("a-1-0001", "long", 1.0, 2.0, channel=0, text="LEFT ONLY", speaker="a"),
            S("a-1-0002", "long", 3.0, 1.5, channel=[0, 1], text="BOTH", speaker="a"),
            S("a-1-0003", "nan", 0.0, 1.0, channel=0, text="NOT A NUMBER", speaker="a"),
            S("a-1-0004", "gone", 0.0, 1.0, channel=0, text="NO RECORDING", speaker="a"),
            S("a-1-0005", "long", 0.0, 1.0, channel=0, text="NOBODY", speaker=None),
            S("a-1-0006", "long", 4.0, 1.0, channel=0, text="ONE", speaker="a"),
            S("a-1-0006", "long", 4.0, 1.0, channel=0, text="TWO", speaker="a")]
    split = _lhotse_split(tmp_path / "m", [long, nan, unused], sups)
    out = tmp_path / "out"
    kept, rejected = audio.resample_split(split, out, fmt="lhotse")
    rows = {r["utt_id"]: r for r in tables.read_manifest(out / "manifest.parquet").to_pylist()}
    rejects = {r["utt_id"]: r["reason"] for r in tables.read_rejects(out / "rejects.parquet").to_pylist()}
    assert set(rows) == {"a-1-0001", "a-1-0002"} and (kept, rejected) == (2, 5)
    assert rows["a-1-0001"]["num_samples"] == 32000 and rows["a-1-0002"]["num_samples"] == 24000
    x = audio.load_utterance(out, rows["a-1-0001"])
    assert np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x) == pytest.approx(300, abs=2)  # channel 0 alone
    both = np.abs(np.fft.rfft(audio.load_utterance(out, rows["a-1-0002"])))
    peaks = sorted(np.argsort(both)[-2:] * 16000 / 24000)
    assert peaks == pytest.approx([300, 700], abs=2)  # the two channels mixed
    assert "nan.wav: 1 samples are NaN" in rejects["a-1-0003"]
    assert "names recording 'gone'" in rejects["a-1-0004"] and "c_supervisions_x.jsonl.gz" in rejects["a-1-0004"]
    assert "has no speaker" in rejects["a-1-0005"]
    assert "a second supervision a-1-0006" in rejects["a-1-0006"] and "which is right is unknown" in rejects["a-1-0006"]
    assert "unused.wav: recording unused" in rejects["unused"] and "has no supervision" in rejects["unused"]
    with pytest.raises(audio.BadInput, match="unused.wav"):
        audio.resample_split(split, tmp_path / "strict", strict=True, fmt="lhotse")


def test_lhotse_split_files_must_be_there_once(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"0 files matching \*_recordings_x.jsonl.gz"):
        audio.resample_split(tmp_path / "x", tmp_path / "out", fmt="lhotse")
