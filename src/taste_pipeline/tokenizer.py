"""TASTE's tokenizer: speech + transcript -> a few discrete codes per text token, and back to units.

    from taste_pipeline.tokenizer import TasteTokenizer
    tok = TasteTokenizer.load("models/taste_rvq")
    codes = tok.encode("speech.flac", "the transcript")   # (text tokens, n_q [+ 1 duration]) integers
    units = tok.decode(codes, "the transcript", speaker="voice.flac")  # free-running units, stops at END

    python -m taste_pipeline.tokenizer encode --model DIR AUDIO TEXT         # prints JSON
    python -m taste_pipeline.tokenizer decode --model DIR --codes JSON TEXT  # JSON: a file or inline

A model with ``train.speaker: embedding`` (the default) decodes in a voice: ``speaker=`` a recording of
it (through the checkpoint's ``speaker.source``) or its embedding; encode's JSON carries the embedding
of the encoded speech, which decode then uses unless ``--speaker`` names another recording.

A checkpoint names the Whisper model (and its middle layer and windows) and the text model and case
its features were made with (``features`` in its config.json, from the tables it was trained on), so
new audio goes through the same resampling, Whisper layers and text tokenization as the pipeline's.
Whisper's precision is a choice of this machine, as in the whisper stage: ``whisper_dtype="auto"``
(``--whisper-dtype``) is bfloat16 only where the hardware computes it natively. The tables the model was
trained on record theirs (``features["whisper.dtype"]``); pass it to get their states exactly (in
bfloat16 the last layer also depends on which windows share a batch, so only float32 is exact).

The tokenize stage (``tokenize_split``) writes the codes of a whole split from the pipeline's own
whisper and text tables, through the same sharded runner as the whisper and s3 stages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import audio, checkpoint, data, hardware, tables
from . import model as model_mod
from . import text as text_mod
from . import whisper as whisper_mod


class TokenizerError(ValueError):
    """Input the tokenizer cannot take: names the model, the file or the transcript, and why."""


def _require_quantizer(model, model_dir) -> None:
    if model.squeeze is None or not model.squeeze.levels:
        raise TokenizerError(f"{model_dir}: a checkpoint with speech: {model.cfg.speech}, squeeze: {model.cfg.squeeze} "
                             f"has no quantizer, so it gives no codes; load one with squeeze: rvq (e.g. models/taste_rvq)")


class TasteTokenizer:
    def __init__(self, model, info: dict, model_dir: str | Path, device: str = "cpu", whisper_dtype: str = "auto"):
        _require_quantizer(model, model_dir)
        if whisper_dtype not in hardware.CHOICES:
            raise TokenizerError(f"whisper_dtype {whisper_dtype!r} is not one of {list(hardware.CHOICES)}")
        feats = info.get("features") or {}
        need = ("whisper.model", "whisper.mid_layer", "text.model", "text.case")
        missing = [k for k in need if k not in feats]
        if missing:
            raise TokenizerError(f"{model_dir}: config.json does not name the features it was trained on ({missing} "
                                 f"missing under 'features'); retrain it with this version of the train stage")
        self.model, self.info, self.model_dir, self.device = model, info, str(model_dir), device
        self.whisper_dtype = whisper_dtype
        self.features = feats
        self._states = None
        self._speaker_encoder = None
        self.text_tokenizer, self.table = text_mod.load(feats["text.model"])
        self.case = feats["text.case"]

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", whisper_dtype: str = "auto") -> "TasteTokenizer":
        """The checkpoint in ``model_dir`` and the Whisper and text models its config names; Whisper runs
        in ``whisper_dtype`` (``auto``: what this hardware computes natively)."""
        if not (Path(model_dir) / checkpoint.MODEL_FILE).exists():
            raise TokenizerError(f"{model_dir}: no {checkpoint.MODEL_FILE} (a trained model folder, e.g. models/taste_rvq)")
        device = hardware.resolve_device(device, "--device")
        model, info = checkpoint.load_checkpoint(model_dir, device)
        return cls(model, info, model_dir, device, whisper_dtype)

    @property
    def levels(self) -> int:
        """Codes per text token: the residual-VQ levels, and the duration code with unit_alignment durations."""
        return self.model.speech.code_width

    @property
    def codebook_size(self) -> int:
        return self.model.squeeze.codebook_size

    @property
    def bits_per_token(self) -> float:
        return self.model.bits_per_token

    def states(self) -> whisper_mod.WhisperStates:
        """Whisper, loaded on first use (decode does not need it)."""
        if self._states is None:
            f = self.features
            model = whisper_mod.load_model(f["whisper.model"])
            windows = json.loads(f.get("whisper.windows_s", "[30]"))
            self._states = whisper_mod.WhisperStates(
                model, whisper_mod.load_feature_extractor(f["whisper.model"], model.config.num_mel_bins),
                int(f["whisper.mid_layer"]), 1, self.device, windows, self.whisper_dtype)
        return self._states

    def text_tokens(self, transcript: str) -> list[int]:
        """The transcript's text tokens, as the text stage makes them; an empty or too long one is an error."""
        if not isinstance(transcript, str) or not transcript.strip():
            raise TokenizerError(f"empty transcript {transcript!r}: the codes are per text token, so it needs some text")
        ids = text_mod.tokenize(self.text_tokenizer, [transcript], self.case)[0]
        room = self.model.cfg.max_text - self.model.cfg.agg_prefix
        if len(ids) > room:
            raise TokenizerError(f"the transcript has {len(ids)} text tokens; {self.model_dir} takes at most {room}")
        return ids

    def load_audio(self, source) -> np.ndarray:
        """16 kHz mono float32 from a file (any rate and channel count soundfile reads) or ``(samples,
        rate)``; goes through the resample stage's own checks and resampling."""
        if isinstance(source, (str, Path)):
            try:
                samples, rate = audio.load_mono(source)
            except audio.BadInput as e:
                raise TokenizerError(str(e)) from None
            name = Path(source)
        else:
            samples, rate = source
            samples = np.asarray(samples, dtype=np.float32)
            if samples.ndim == 2:
                samples = samples.mean(axis=1)
            name = Path("<array>")
            if samples.ndim != 1 or len(samples) == 0:
                raise TokenizerError(f"audio array of shape {samples.shape}: expected (samples,) or (samples, channels)")
            try:
                audio.check_finite(name, samples)
            except audio.BadInput as e:
                raise TokenizerError(str(e)) from None
        samples, _ = audio.fit_full_scale(name, samples)
        return np.clip(audio.resample(samples, int(rate)), -1.0, 1.0)

    def speaker_embedding(self, voice) -> np.ndarray:
        """The speaker embedding that a model with ``speaker: embedding`` decodes in: of ``voice``, a
        recording (a file path or ``(samples, rate)``) through the encoder the model was trained with
        (its ``speaker.source``), or an embedding already made (a 1-D array of the model's width)."""
        width = self.model.cfg.d_speaker
        if not isinstance(voice, (str, Path, tuple)):
            emb = np.asarray(voice, dtype=np.float32)
            if emb.shape != (width,) or not np.isfinite(emb).all():
                raise TokenizerError(f"speaker embedding of shape {emb.shape}: {self.model_dir} takes ({width},) finite values")
            return emb
        if self._speaker_encoder is None:
            from . import speaker

            source = self.features.get("speaker.source")
            if source is None:
                raise TokenizerError(f"{self.model_dir}: config.json does not name its speaker encoder; pass an embedding")
            self._speaker_encoder = speaker.load(source)
        return self._speaker_encoder.embed(self.load_audio(voice))

    def _batch(self, ids: list[int]) -> dict:
        emb = torch.from_numpy(text_mod.embed(self.table, ids).astype(np.float32))
        return {"text_emb": emb[None].to(self.device), "text_len": torch.tensor([len(ids)], device=self.device)}

    @torch.no_grad()
    def encode(self, speech, transcript: str) -> np.ndarray:
        """(text tokens, ``levels``) codes of ``speech`` (a file path or ``(samples, rate)``) and its
        transcript: n_q residual-VQ codes, then (unit_alignment durations) the token's frames."""
        ids = self.text_tokens(transcript)
        samples = self.load_audio(speech)
        # Rounded as the whisper table stores them: the model was trained on float16 states, and the
        # codes of a pipeline utterance are then the tokenize stage's.
        mid, last = (torch.from_numpy(x.astype(np.float16).astype(np.float32))[None].to(self.device)
                     for x in self.states()([samples])[0])
        batch = dict(self._batch(ids), mid=mid, last=last,
                     frame_len=torch.tensor([mid.shape[1]], device=self.device))
        return self.model.encode(batch)[0].cpu().numpy()

    @torch.no_grad()
    def decode(self, codes, transcript: str, max_units: int | None = None, top_k: int | None = 25,
               seed: int = 0, speaker=None) -> list[int]:
        """Units generated from the transcript and one row of codes per text token, up to END: sampled
        from the ``top_k`` likeliest with a generator seeded by ``seed`` (repeatable), as the free-running
        evaluation does; ``top_k=None`` is greedy, which on 50 Hz units tends to loop on one unit.
        ``speaker`` (a model with ``speaker: embedding``): the voice, see ``speaker_embedding``."""
        ids = self.text_tokens(transcript)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape != (len(ids), self.levels):
            raise TokenizerError(f"codes of shape {codes.shape}: the transcript has {len(ids)} text tokens and "
                                 f"{self.model_dir} has {self.levels} levels, so ({len(ids)}, {self.levels}) is needed")
        n_q = self.model.squeeze.levels
        if not np.issubdtype(codes.dtype, np.integer) or codes[:, :n_q].min() < 0 or codes[:, :n_q].max() >= self.codebook_size:
            raise TokenizerError(f"codes must be integers in [0, {self.codebook_size})")
        if codes.shape[1] > n_q and (codes[:, n_q:].min() < 0 or codes[:, n_q:].max() > model_mod.DURATION_MAX):
            raise TokenizerError(f"the last code of each token is its duration: frames in [0, {model_mod.DURATION_MAX}]")
        batch = dict(self._batch(ids), codes=torch.from_numpy(codes.astype(np.int64))[None].to(self.device))
        if self.model.cfg.speaker != "none":
            if speaker is None:
                raise TokenizerError(f"{self.model_dir} decodes in a voice: pass speaker= (a recording of the voice "
                                     f"or its embedding; the CLI's --speaker)")
            batch["speaker"] = torch.from_numpy(self.speaker_embedding(speaker))[None].to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self.model.generate(batch, max_units=max_units, top_k=top_k, generator=g)[0].tolist()


def tokenize_split(model_dir: str | Path, manifest_path: str | Path, whisper_path: str | Path, text_path: str | Path,
                   out_path: str | Path, batch_size: int = 32, device: str = "cpu", rows_per_group: int = 64,
                   partial_dir: str | Path | None = None) -> int:
    """Write the codes table of one split from its whisper and text tables (``extract.run``)."""
    from . import extract
    from .ranks import Ranks

    ranks = Ranks.from_env()
    device = ranks.device(hardware.resolve_device(device, "tokenize.device"))
    model, info = checkpoint.load_checkpoint(model_dir, device)
    _require_quantizer(model, model_dir)
    split = data.Split(manifest_path, whisper_path, text_path)
    index = {u: i for i, u in enumerate(split.utt_ids)}
    manifest = tables.read_manifest(manifest_path)
    n_tokens = sum(split.num_text_tokens(i) for i in range(len(split)))
    seconds = float(np.sum(manifest.column("duration").to_numpy()))
    squeeze, bits = model.squeeze, model.bits_per_token
    meta = {"tokenizer.model": str(model_dir), "tokenizer.variant": Path(model_dir).name,
            "rvq_levels": str(squeeze.levels), "rvq_codebook_size": str(squeeze.codebook_size),
            "bits_per_token": str(bits), "text_tokens_per_s": str(n_tokens / seconds),
            "bitrate_bps": str(n_tokens * bits / seconds), "targets": info.get("targets", "")}
    if model.speech.code_width > squeeze.levels:
        meta["duration_bits"] = str(model_mod.DURATION_BITS)

    @torch.no_grad()
    def encode(rows: list[dict], _audios) -> dict[str, list]:
        idx = [index[r["utt_id"]] for r in rows]
        ex = split.examples(idx)
        codes = {}
        for b in range(0, len(idx), batch_size):
            group = idx[b : b + batch_size]
            batch = data.to_device(data.collate([ex[i] for i in group]), device)
            for i, c in zip(group, model.encode(batch).cpu().numpy()):
                codes[i] = c[: len(ex[i].token_ids)]
        return {"token_ids": [ex[i].token_ids.astype(np.int32).tolist() for i in idx],
                "codes": tables.code_column([codes[i] for i in idx], model.speech.code_width)}

    files = [Path(model_dir) / checkpoint.MODEL_FILE, Path(model_dir) / checkpoint.CONFIG_FILE,
             Path(whisper_path), Path(text_path)]
    n = extract.run("tokenize", manifest_path, out_path, tables.codes_schema(model.speech.code_width), meta,
                    {"batch_size": batch_size, "rows_per_group": rows_per_group}, encode, rows_per_group,
                    partial_dir, ranks, files, needs_audio=False)
    if ranks.rank == 0:
        tables.read_codes(out_path)
    return n


def _codes_arg(value: str):
    """--codes: inline JSON or a JSON file; a list of rows or encode's output (an object with "codes" and,
    for a model that decodes in a voice, "speaker"). Returns (codes, speaker embedding or None)."""
    inline = value.lstrip().startswith(("[", "{"))
    if not inline and not Path(value).is_file():
        raise TokenizerError(f"--codes {value!r}: neither inline JSON nor an existing file")
    try:
        obj = json.loads(value if inline else Path(value).read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"--codes {value[:60]!r}: not valid JSON ({e})") from None
    return (obj["codes"], obj.get("speaker")) if isinstance(obj, dict) else (obj, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taste_pipeline.tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="audio + transcript -> codes (JSON)")
    enc.add_argument("audio")
    dec = sub.add_parser("decode", help="codes + transcript -> units (JSON)")
    dec.add_argument("--codes", required=True, help="JSON: a list of rows, or encode's output; inline or a file")
    dec.add_argument("--max-units", type=int, default=None)
    dec.add_argument("--top-k", type=int, default=25, help="sample from the k likeliest units (0: greedy)")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--speaker", help="a recording of the voice to decode in (models with train.speaker "
                     "embedding; default: the embedding in encode's output, if --codes is one)")
    for p in (enc, dec):
        p.add_argument("--model", required=True, help="a taste_rvq model folder, e.g. models/taste_rvq")
        p.add_argument("--device", default="cpu")
        p.add_argument("text", help="the transcript")
    enc.add_argument("--whisper-dtype", default="auto", choices=hardware.CHOICES,
                     help="Whisper's precision (auto: bfloat16 only where native; the training tables' is "
                          "features.whisper.dtype in the model's config.json)")
    args = ap.parse_args(argv)
    try:
        tok = TasteTokenizer.load(args.model, args.device, getattr(args, "whisper_dtype", "auto"))
        if args.command == "encode":
            samples = tok.load_audio(args.audio)  # once: encode takes (samples, rate) as well as a path
            codes = tok.encode((samples, tables.SAMPLE_RATE), args.text)
            seconds = len(samples) / tables.SAMPLE_RATE
            out = {"model": args.model, "text_tokens": tok.text_tokens(args.text), "codes": codes.tolist(),
                   **({"speaker": tok.speaker_embedding((samples, tables.SAMPLE_RATE)).tolist()}
                      if tok.model.cfg.speaker != "none" else {}),
                   "levels": tok.levels, "codebook_size": tok.codebook_size, "bits_per_token": tok.bits_per_token,
                   "seconds": seconds, "bitrate_bps": len(codes) * tok.bits_per_token / seconds}
        else:
            codes, voice = _codes_arg(args.codes)
            units = tok.decode(codes, args.text, args.max_units, args.top_k or None, args.seed,
                               args.speaker or voice)
            out = {"model": args.model, "units": units, "num_units": len(units),
                   "seconds": len(units) / (tables.SAMPLE_RATE / tables.SAMPLES_PER_FRAME),
                   "targets": tok.info.get("targets", "")}
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
