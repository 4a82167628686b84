"""Speech from the evaluate stage's free-running units through CosyVoice's own flow-matching model and
HiFT vocoder (CosyVoice-300M): the real path, for a pipeline whose targets are S3 units
(`s3.source: modelscope:iic/CosyVoice-300M`) and whose speaker table is CAM++ (`speaker.source` the
same), as TASTE's decoder and CosyVoice's flow read them.

CosyVoice ships no installable package, so this runs inside a CosyVoice checkout and its environment
(it imports only what that environment has: torch, numpy, pyarrow, soundfile and `cosyvoice`), and
`scripts/score_rebuilt.py` then scores the audio in this project's environment. The commands, against
a pinned CosyVoice commit, are in docs/RESULTS.md ("Rebuilding S3 units with CosyVoice").

    python scripts/cosyvoice_rebuild.py --units data/eval/free_units.parquet \
        --speaker data/features/speaker/<test split>.parquet --model pretrained_models/CosyVoice-300M --out rebuilt

Writes <out>/<utt_id>/<source>.wav (CosyVoice's rate, 22,050 Hz for CosyVoice-300M) and <out>/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

S3_TARGETS = "cosyvoice-300m-speech_tokenizer_v1"  # tables' "targets" for real S3 units (s3.S3_NAME)
CAMPPLUS_WIDTH = 192


def read_inputs(units_path: str, speaker_path: str) -> tuple[list[tuple[str, str, np.ndarray]], dict[str, np.ndarray]]:
    """The units table's rows and the speaker embeddings by utt_id, after checking that both are what
    CosyVoice's flow reads: S3 units (a stand-in's are other codes) and 192-d CAM++ embeddings."""
    import pyarrow.parquet as pq

    units = pq.read_table(units_path)
    meta = {k.decode(): v.decode() for k, v in (units.schema.metadata or {}).items()}
    if meta.get("targets") != S3_TARGETS:
        raise SystemExit(f"{units_path}: targets {meta.get('targets')!r}, not S3 ({S3_TARGETS}): CosyVoice's flow "
                         "reads S3 units only (the offline stand-ins are other codes; see docs/RESULTS.md)")
    spk = pq.read_table(speaker_path)
    width = spk.schema.field("emb").type.list_size
    if width != CAMPPLUS_WIDTH:
        source = (spk.schema.metadata or {}).get(b"speaker.source", b"?").decode()
        raise SystemExit(f"{speaker_path}: {width}-d embeddings from {source}; CosyVoice's flow reads CAM++'s "
                         f"{CAMPPLUS_WIDTH}-d (speaker.source: modelscope:iic/CosyVoice-300M)")
    emb = {u: np.asarray(e, np.float32) for u, e in zip(spk.column("utt_id").to_pylist(), spk.column("emb").to_pylist())}
    rows = [(u, s, np.asarray(x, np.int64)) for u, s, x in
            zip(*(units.column(c).to_pylist() for c in ("utt_id", "source", "units")))]
    missing = sorted({u for u, _, _ in rows} - set(emb))
    if missing:
        raise SystemExit(f"{speaker_path}: no embedding for {missing[:5]} ({len(missing)} utterances)")
    return rows, emb


def token2wav(model, units: np.ndarray, embedding: np.ndarray, key: str) -> np.ndarray:
    """One utterance through ``CosyVoiceModel.token2wav`` (flow + HiFT), with no prompt, in one piece
    (``finalize=True``); the per-utterance caches are set up as ``CosyVoiceModel.tts`` does and dropped."""
    import torch

    model.hift_cache_dict[key] = None
    model.mel_overlap_dict[key] = torch.zeros(1, 80, 0)
    model.flow_cache_dict[key] = torch.zeros(1, 80, 0, 2)
    try:
        speech = model.token2wav(token=torch.from_numpy(units)[None], prompt_token=torch.zeros(1, 0, dtype=torch.int32),
                                 prompt_feat=torch.zeros(1, 0, 80), embedding=torch.from_numpy(embedding)[None],
                                 uuid=key, finalize=True)
    finally:
        for d in (model.hift_cache_dict, model.mel_overlap_dict, model.flow_cache_dict):
            d.pop(key, None)
    return speech.float().cpu().numpy().reshape(-1)


def rebuild_all(rows, emb: dict[str, np.ndarray], model, sample_rate: int, out: str | Path) -> list[dict]:
    """Every row's audio to <out>/<utt_id>/<source>.wav (written whole, then renamed); returns the index."""
    import soundfile as sf

    out = Path(out)
    index = []
    for k, (utt, source, units) in enumerate(rows):
        if not len(units):  # a variant that said END at once: no audio to make
            index.append({"utt_id": utt, "source": source, "file": None, "seconds": 0.0})
            continue
        wav = token2wav(model, units, emb[utt], f"{utt}/{source}")
        path = out / utt / f"{source}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".wav.tmp")
        sf.write(str(tmp), wav, sample_rate, format="WAV", subtype="PCM_16")
        os.replace(tmp, path)
        index.append({"utt_id": utt, "source": source, "file": f"{utt}/{source}.wav", "seconds": len(wav) / sample_rate})
        print(f"[{k + 1}/{len(rows)}] {utt} {source}: {len(wav) / sample_rate:.2f} s", flush=True)
    (out / "index.json").write_text(json.dumps({"sample_rate": sample_rate, "rows": index}, indent=1))
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", required=True, help="the evaluate stage's free-running units (data/eval/free_units.parquet)")
    ap.add_argument("--speaker", required=True, help="the speaker table of the test split (CAM++, 192-d)")
    ap.add_argument("--model", default="pretrained_models/CosyVoice-300M", help="CosyVoice-300M's folder (or its ModelScope id)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows, emb = read_inputs(args.units, args.speaker)
    sys.path.append("third_party/Matcha-TTS")  # as CosyVoice's own examples do: its flow imports matcha
    from cosyvoice.cli.cosyvoice import CosyVoice

    cosyvoice = CosyVoice(args.model, load_jit=False, load_trt=False, fp16=False)
    rebuild_all(rows, emb, cosyvoice.model, cosyvoice.sample_rate, args.out)


if __name__ == "__main__":
    main()
