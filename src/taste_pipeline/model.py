"""The TASTE model, readable in one sitting: aggregator -> fusion -> causal unit decoder.

Aggregator: Whisper-decoder-shaped layers whose cross-attention takes its queries from text tokens,
its keys from the last Whisper encoder layer and its values from a middle layer, with key-padding
masks; one output vector per text token. It can start from the pretrained Whisper decoder (whose
cross-attention already aligns text to audio); then the value projection starts as identity, because
the values come from another layer than the one it was trained on.

Fusion: TASTE's weighted sum of a text branch and a speech branch with two softmax-normalised weights.
``text_only`` is the same model without the speech branch: it never reads speech features.
``taste_rvq`` is taste with a residual vector quantizer on the speech vectors (TASTE's tokenizer): a few
discrete codes per text token, from which alone the decoder rebuilds the units (``encode``; ``generate``
with ``codes``).
``speech_frames`` is the topline (TASTE's "encoder only, 50 Hz"): text_only's decoder plus, at every
unit position, the Whisper frame of that time (mid and last layers, projected). It bounds what speech
can add; taste must get its speech through one vector per text token instead.

Decoder: a causal transformer over [fused text-length prefix, TASK, u_1 .. u_T] that predicts
u_1 .. u_T, END (the shape of CosyVoice's text-to-token LM). Loss only on the unit positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train_params import AGGREGATING, VARIANTS, ModelArgs, ParamError

# unit_alignment durations: a token's span in frames, coded in 8 bits (255 frames = 5.1 s; longer spans,
# rare and mostly trailing silence, are cut there in training and coding alike).
DURATION_BITS = 8
DURATION_MAX = 2**DURATION_BITS - 1
# Free-running generation stops an item that has not said END at GENERATE_SLACK x the training data's most
# units per text token, times its text tokens, + GENERATE_EXTRA units (1 s): far past any sane length, so
# a model that never says END shows as no_end, not as a long run.
GENERATE_SLACK, GENERATE_EXTRA = 2.0, 50


@dataclass(frozen=True)
class ModelConfig(ModelArgs):
    """The ``train`` params' ModelArgs plus what the data and the Whisper model decide. Saved in every
    checkpoint as ``model_args``, from which alone the model is rebuilt."""

    variant: str = "taste"
    vocab_size: int = 128  # target units; END and TASK are added after them
    d_query: int = 384  # text embedding width
    d_audio: int = 384  # Whisper encoder width (keys and values)
    agg_heads: int = 6
    agg_ffn: int = 1536
    max_text: int = 448  # aggregator positions, Whisper's prefix included
    agg_prefix: int = 2  # tokens before the text: 2 for English-only Whisper (and fresh), 4 for multilingual
    # The most units per text token of any training utterance: free-running generation stops an item at
    # GENERATE_SLACK times that many units per token of its text (what a user has; never the reference
    # length). 0: not known (a checkpoint from before it was kept), the cap is max_len.
    max_units_per_token: float = 0.0

    @classmethod
    def build(cls, args: ModelArgs, **rest) -> "ModelConfig":
        """The config for ``args`` (any ModelArgs, the train params included) and the other fields."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(ModelArgs)}, **rest)

    @property
    def bits_per_token(self) -> float:
        """taste_rvq: bits of speech per text token (levels x log2 codebook size, plus the duration code's
        8 bits with unit_alignment durations); 0 for the others."""
        if self.variant != "taste_rvq":
            return 0.0
        return self.rvq_levels * math.log2(self.rvq_codebook_size) + (DURATION_BITS if self.coded_durations else 0)

    @property
    def coded_durations(self) -> bool:
        return self.unit_alignment == "durations"

    @property
    def code_width(self) -> int:
        """taste_rvq: codes per text token, the residual-VQ levels and then the duration code if any."""
        return self.rvq_levels + self.coded_durations

    def unit_cap(self, text_len: torch.Tensor) -> torch.Tensor:
        """(B,) the most units ``generate`` gives an item of ``text_len`` text tokens (see max_units_per_token)."""
        top = torch.full_like(text_len, self.max_len - 1)
        if self.max_units_per_token <= 0:
            return top
        cap = torch.ceil(GENERATE_SLACK * self.max_units_per_token * text_len.float()).long() + GENERATE_EXTRA
        return torch.minimum(cap, top)

    @property
    def end_id(self) -> int:
        return self.vocab_size

    @property
    def task_id(self) -> int:
        return self.vocab_size + 1


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder positional table: (length, channels), sin half then cos half."""
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class Attention(nn.Module):
    """Multi-head attention with separate key and value sources (self-attention: all three are x)."""

    def __init__(self, d: int, heads: int, d_kv: int | None = None, dropout: float = 0.0, key_bias: bool = False):
        super().__init__()
        d_kv = d_kv or d
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d_kv, d, bias=key_bias)  # Whisper's key projections have no bias
        self.v_proj = nn.Linear(d_kv, d)
        self.out_proj = nn.Linear(d, d)
        self.last_weights: torch.Tensor | None = None  # (B, heads, Lq, Lk) when keep_weights
        self.keep_weights = False

    def forward(self, x, keys=None, values=None, key_mask=None, causal=False, cache: dict | None = None,
                also: torch.Tensor | None = None):
        """``cache`` (self-attention while generating): keys and values of earlier positions, written in
        place into buffers of ``cache["capacity"]`` positions (growing them by concatenation copied the
        whole cache every step: generation went quadratic); ``x`` then holds only the new positions,
        which come after them. ``also`` (B, Lk, C):
        a second, unprojected value source read with the same attention, mean over heads; then the
        result is (output, that read)."""
        keys = x if keys is None else keys
        values = keys if values is None else values
        B, Lq, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(keys)), split(self.v_proj(values))
        if cache is not None:
            if "k" not in cache:
                shape = (B, self.heads, cache["capacity"], D // self.heads)
                cache["k"], cache["v"], cache["n"] = k.new_empty(shape), v.new_empty(shape), 0
            n = cache["n"]
            cache["k"][:, :, n : n + Lq], cache["v"][:, :, n : n + Lq] = k, v
            cache["n"] = n + Lq
            k, v = cache["k"][:, :, : n + Lq], cache["v"][:, :, : n + Lq]
        past = k.shape[2] - Lq  # positions before the first query (0 without a cache)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, Lk) True = real frame
        if causal and (mask is not None or self.keep_weights or past):
            c = torch.ones(Lq, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask, causal = (c if mask is None else mask & c), False
        if self.keep_weights:
            w = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if mask is not None:
                w = w.masked_fill(~mask, float("-inf"))
            self.last_weights = w.softmax(-1).detach()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(B, Lq, D))
        if also is None:
            return y
        extra = also[:, None].expand(B, self.heads, *also.shape[1:]).to(q.dtype)
        return y, F.scaled_dot_product_attention(q, k, extra, attn_mask=mask, is_causal=causal).mean(1)


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class AggregatorLayer(nn.Module):
    """A Whisper decoder layer (pre-LN): causal self-attention, cross-attention (K, V apart), MLP."""

    def __init__(self, d: int, heads: int, d_ff: int, d_audio: int, dropout: float):
        super().__init__()
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(d), Attention(d, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, heads, d_audio)
        self.final_layer_norm, self.mlp = nn.LayerNorm(d), MLP(d, d_ff, dropout)

    def forward(self, x, keys, values, frame_mask, clock=None):
        """Returns the new hidden state, what the cross-attention read and, given ``clock`` (the frames'
        time codes), where it read: the same attention over the clock."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal=True)
        h = self.encoder_attn_layer_norm(x)
        read, when = self.encoder_attn(h, keys, values, key_mask=frame_mask, also=clock), None
        if clock is not None:
            read, when = read
        x = x + read
        return x + self.mlp(self.final_layer_norm(x)), read, when


class Aggregator(nn.Module):
    """Text-token queries attend over Whisper frames: (B, L, d_query) -> (B, L, d_audio)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_audio
        self.in_proj = nn.Identity() if cfg.d_query == d else nn.Linear(cfg.d_query, d)
        # Whisper's task prefix (``whisper.prefix_tokens``): the context its decoder was trained to read text in.
        self.num_prefix = cfg.agg_prefix
        self.prefix = nn.Parameter(torch.randn(self.num_prefix, d) * 0.02)
        self.positions = nn.Parameter(torch.randn(cfg.max_text, d) * 0.02)  # prefix included
        self.layers = nn.ModuleList(AggregatorLayer(d, cfg.agg_heads, cfg.agg_ffn, d, cfg.dropout)
                                    for _ in range(cfg.agg_layers))
        self.layer_norm = nn.LayerNorm(d)
        if cfg.agg_time_code:
            self.register_buffer("frame_clock", sinusoids(cfg.max_len, d), persistent=False)
            self.time_proj = nn.Linear(d, d)
        self.time_code = cfg.agg_time_code
        if cfg.unit_alignment != "none":
            self.layers[-1].encoder_attn.keep_weights = True
        self.value_layers = cfg.agg_value_layers
        self.freeze_alignment = cfg.agg_freeze_alignment
        self.output = cfg.agg_output

    def forward(self, text_emb, mid, last, frame_mask):
        B, L, _ = text_emb.shape
        x = torch.cat([self.prefix.expand(B, -1, -1), self.in_proj(text_emb)], dim=1)
        if L + self.num_prefix > len(self.positions):
            raise ValueError(f"{L} text tokens exceed the aggregator's {len(self.positions) - self.num_prefix} positions")
        x = x + self.positions[: L + self.num_prefix]
        first_mid = len(self.layers) - self.value_layers
        clock = self.frame_clock[: last.shape[1]].expand(B, -1, -1) if self.time_code else None
        reads, whens = [], []
        for i, layer in enumerate(self.layers):
            value_layer = i >= first_mid
            x, read, when = layer(x, last, mid if value_layer else last, frame_mask, clock if value_layer else None)
            if value_layer:
                reads.append(read)
                whens.append(when)
        out = torch.stack(reads).sum(0) if self.output == "attention" else self.layer_norm(x)
        if self.time_code:
            out = out + self.time_proj(torch.stack(whens).mean(0).to(out.dtype))
        return out[:, self.num_prefix :]

    @torch.no_grad()
    def init_from_whisper(self, whisper_model, prefix: list[int]) -> None:
        """Copy the first layers of a transformers Whisper decoder and the embeddings of its task
        prefix (``prefix``: token ids, ``whisper.prefix_tokens``); the mid-value layers' value
        projections start as identity."""
        dec = whisper_model.model.decoder
        cfg = whisper_model.config
        if len(self.layers) > len(dec.layers):
            raise ValueError(f"train.agg_layers: {len(self.layers)} > the Whisper decoder's {len(dec.layers)} layers")
        if self.prefix.shape[1] != cfg.d_model:
            raise ValueError(f"train.agg_init=whisper needs Whisper width {cfg.d_model}, got {self.prefix.shape[1]}")
        if len(prefix) != self.num_prefix:
            raise ValueError(f"{len(prefix)} prefix tokens for an aggregator built for {self.num_prefix}")
        self.prefix.copy_(dec.embed_tokens.weight[list(prefix)])
        self.positions.copy_(dec.embed_positions.weight[: self.positions.shape[0]])
        for ours, theirs in zip(self.layers, dec.layers):
            missing, unexpected = ours.load_state_dict(
                {k.replace("fc1", "mlp.fc1").replace("fc2", "mlp.fc2"): v for k, v in theirs.state_dict().items()},
                strict=False)
            if unexpected or any("k_proj.bias" not in m for m in missing):
                raise ValueError(f"Whisper decoder layer does not fit: missing {missing}, unexpected {unexpected}")
        for ours in self.layers[len(self.layers) - self.value_layers :]:
            # The values come from another layer than the one v_proj was trained on: start from identity.
            ours.encoder_attn.v_proj.weight.copy_(torch.eye(cfg.d_model))
            ours.encoder_attn.v_proj.bias.zero_()
        self.layer_norm.load_state_dict(dec.layer_norm.state_dict())
        if self.freeze_alignment:
            self.prefix.requires_grad_(False)
            self.positions.requires_grad_(False)
            first_mid = len(self.layers) - self.value_layers
            for i, layer in enumerate(self.layers):
                for name, p in layer.named_parameters():
                    reads_values = name.startswith(("encoder_attn.v_proj", "encoder_attn.out_proj", "mlp", "final_layer_norm"))
                    p.requires_grad_(i >= first_mid and reads_values)


def token_spans(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, R) token index per step: (steps since the run of equal tokens holding each step began,
    that run's length). [[0, 0, 0, 1, 1]] -> ([[0, 1, 2, 0, 1]], [[3, 3, 3, 2, 2]])."""
    B, R = token.shape
    r = torch.arange(R, device=token.device)[None].expand(B, R)
    begins = torch.ones_like(token, dtype=torch.bool)
    begins[:, 1:] = token[:, 1:] != token[:, :-1]
    ends = torch.ones_like(begins)
    ends[:, :-1] = begins[:, 1:]
    start = torch.where(begins, r, torch.zeros_like(r)).cummax(1).values
    end = torch.where(ends, r, torch.full_like(r, R)).flip(1).cummin(1).values.flip(1)
    return r - start, end - start + 1


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, key_bias=True)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask=None, cache: dict | None = None):
        x = x + self.drop(self.attn(self.ln1(x), key_mask=key_mask, causal=True, cache=cache))
        return x + self.mlp(self.ln2(x))


class TasteModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        if cfg.variant not in VARIANTS:
            raise ParamError(f"train.variants: model {cfg.variant!r} is not one of {VARIANTS}")
        self.cfg = cfg
        self.text_branch = nn.Linear(cfg.d_query, cfg.d_model)
        if cfg.variant in AGGREGATING:
            self.aggregator = Aggregator(cfg)
            self.speech_branch = nn.Linear(cfg.d_audio, cfg.d_model)
            self.fusion_logits = nn.Parameter(torch.zeros(2))  # softmax -> equal weights at the start
        if cfg.variant == "taste_rvq":
            from vector_quantize_pytorch import ResidualVQ

            self.quantizer = ResidualVQ(
                dim=cfg.d_audio, num_quantizers=cfg.rvq_levels, codebook_size=cfg.rvq_codebook_size,
                decay=cfg.rvq_decay, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=cfg.rvq_dead_code,
                commitment_weight=cfg.rvq_commitment, quantize_dropout=cfg.rvq_dropout)
        if cfg.variant == "speech_frames":
            self.frame_proj = nn.Linear(2 * cfg.d_audio, cfg.d_model)
        self.unit_emb = nn.Embedding(cfg.vocab_size + 2, cfg.d_model)
        # Positions count separately in the text prefix and in the unit stream, so a unit's position is
        # its time (20 ms steps) whatever the text length: both variants get the same clock.
        self.text_pos_emb = nn.Embedding(cfg.max_text, cfg.d_model)
        if cfg.unit_positions == "whisper_sinusoid":
            self.register_buffer("unit_clock", sinusoids(cfg.max_len, cfg.d_audio), persistent=False)
            self.unit_pos = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)
        else:
            self.unit_pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        if cfg.unit_alignment != "none":
            # Where unit r lies in its token's span: frames since the span began, and the span's length.
            self.register_buffer("span_clock", sinusoids(cfg.max_len, cfg.d_audio), persistent=False)
            self.span_since = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)
            self.span_length = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size + 1)  # units + END

    def speech_vectors(self, text_emb, mid, last, frame_mask):
        """One vector per text token: (B, L, d_audio)."""
        return self.aggregator(text_emb, mid, last, frame_mask)

    def quantize(self, vectors, text_mask):
        """taste_rvq: (quantized vectors, codes (B, L, n_q), commitment loss). Outside autocast: the
        nearest-code search and the EMA updates need float32. Padded tokens neither train the codebooks
        nor count in the loss; their codes are -1 (so are the levels quantizer dropout skipped)."""
        with torch.autocast(vectors.device.type, enabled=False):
            q, codes, commit = self.quantizer(vectors.float(), mask=text_mask)
        return q, codes.masked_fill(~text_mask[..., None], -1), commit.sum()

    @property
    def codebooks_ready(self) -> bool:
        """taste_rvq: whether every level's codebook has been k-means-initialised."""
        return all(bool(vq._codebook.initted) for vq in self.quantizer.layers)

    @torch.no_grad()
    def init_codebooks(self, vectors: torch.Tensor) -> None:
        """k-means-initialise every level on ``vectors`` (N, d_audio), level k on the residuals the
        levels before it leave. Left to the library, each level would be initialised on the first
        training batch: a few hundred vectors for 512 codes, most of them duplicates."""
        was_training, dropout = self.quantizer.training, self.quantizer.quantize_dropout
        self.quantizer.train()
        self.quantizer.quantize_dropout = False  # every level must see its residuals
        try:
            self.quantizer(vectors.float()[None])
        finally:
            self.quantizer.train(was_training)
            self.quantizer.quantize_dropout = dropout

    def encode(self, batch: dict) -> torch.Tensor:
        """taste_rvq: the codes of each text token, (B, L, ``cfg.code_width``): the residual-VQ levels,
        then (unit_alignment durations) the token's duration in frames; -1 at padding. Call in eval mode."""
        if self.cfg.variant != "taste_rvq":
            raise ValueError(f"a {self.cfg.variant} model has no quantizer: only taste_rvq gives codes")
        codes = self.speech(batch)[1]
        if not self.cfg.coded_durations:
            return codes
        return torch.cat([codes, self.durations(batch)[..., None].masked_fill(codes[..., :1] < 0, -1)], dim=-1)

    def speech(self, batch: dict):
        """(speech vectors (B, L, d_audio), codes or None, auxiliary loss) of an aggregating variant. A
        batch with ``codes`` (taste_rvq) is decoded from them instead of from the Whisper states."""
        text_emb, text_len = batch["text_emb"], batch["text_len"]
        dev = text_emb.device
        text_mask = torch.arange(text_emb.shape[1], device=dev)[None] < text_len[:, None]
        zero = torch.zeros((), device=dev)
        if batch.get("codes") is not None:
            if self.cfg.variant != "taste_rvq":
                raise ValueError(f"a {self.cfg.variant} model has no quantizer to decode codes with")
            codes = batch["codes"]
            if codes.shape[-1] != self.cfg.code_width:
                raise ValueError(f"{codes.shape[-1]} codes per token; this model takes {self.cfg.code_width}")
            rvq = codes[..., : self.cfg.rvq_levels].clamp(min=0)
            return self.quantizer.get_output_from_indices(rvq) * text_mask[..., None], codes, zero
        frame_mask = torch.arange(batch["mid"].shape[1], device=dev)[None] < batch["frame_len"][:, None]
        vectors = self.speech_vectors(text_emb, batch["mid"], batch["last"], frame_mask)
        if self.cfg.variant != "taste_rvq":
            return vectors, None, zero
        return self.quantize(vectors, text_mask)

    def token_of_frame(self, batch: dict) -> torch.Tensor:
        """unit_alignment attention, after ``speech``: (B, F) the text token that the value layer's
        attention (mean over heads) puts at each frame, the one attending most to it."""
        w = self.aggregator.layers[-1].encoder_attn.last_weights.float().mean(1)[:, self.aggregator.num_prefix :]
        real = torch.arange(w.shape[1], device=w.device)[None] < batch["text_len"][:, None]
        return w.masked_fill(~real[..., None], float("-inf")).argmax(1)

    def durations(self, batch: dict) -> torch.Tensor:
        """unit_alignment durations, after ``speech``: (B, L) the frames ``token_of_frame`` gives each
        text token, at most DURATION_MAX; 0 at padding. From the batch's duration codes when it has codes."""
        if batch.get("codes") is not None:
            return batch["codes"][..., -1].clamp(min=0)
        tok = self.token_of_frame(batch)
        real = torch.arange(tok.shape[1], device=tok.device)[None] < batch["frame_len"][:, None]
        counts = torch.zeros(tok.shape[0], batch["text_emb"].shape[1], dtype=torch.long, device=tok.device)
        return counts.scatter_add_(1, tok, real.long()).clamp(max=DURATION_MAX)

    def speech_end(self, batch: dict) -> torch.Tensor:
        """unit_alignment, after ``speech``: (B,) the step where the speech ends (its frames, or the sum of
        its tokens' durations)."""
        return batch["frame_len"] if self.cfg.unit_alignment == "attention" else self.durations(batch).sum(1)

    def step_tokens(self, prefix: torch.Tensor, batch: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the text token at unit-stream step r (B, steps), the last token's past the speech's end;
        where the speech ends (B,), in steps)."""
        r = torch.arange(steps, device=prefix.device)[None]
        if self.cfg.unit_alignment == "attention":
            tok = self.token_of_frame(batch)
            f = torch.minimum(r, (batch["frame_len"] - 1)[:, None]).clamp(min=0)
            return tok.gather(1, f.clamp(max=tok.shape[1] - 1)), batch["frame_len"]
        # durations: the tokens laid end to end in text order, token i on the steps from the sum of the
        # durations before it to the sum up to it (a token of 0 frames holds none).
        ends = self.durations(batch).cumsum(1)
        idx = torch.searchsorted(ends, r.expand(ends.shape[0], -1).contiguous(), right=True)
        return torch.minimum(idx, (batch["text_len"] - 1).clamp(min=0)[:, None]), ends[:, -1]

    def placed(self, prefix: torch.Tensor, batch: dict, steps: int) -> torch.Tensor:
        """unit_alignment: (B, steps, d_model), for unit-stream input r the fused vector of the token at
        frame r (the last token past the end) plus where r lies in that token's span."""
        # Spans are measured over all of the speech, however few steps are asked for, and steps past the
        # last frame are a run of their own of length 0 (no span): so every step's input is the same in
        # training (the batch's units), in evaluation and in generate (max_units).
        idx, end = self.step_tokens(prefix, batch, max(steps, int(self.speech_end(batch).max()) + 1))
        r = torch.arange(idx.shape[1], device=idx.device)[None]
        past = r >= end[:, None]
        since, length = token_spans(idx.masked_fill(past, -1))
        idx, since, length = idx[:, :steps], since[:, :steps], length.masked_fill(past, 0)[:, :steps]
        top = self.cfg.max_len - 1
        return (prefix.gather(1, idx[..., None].expand(-1, -1, prefix.shape[-1]))
                + self.span_since(self.span_clock[since.clamp(max=top)])
                + self.span_length(self.span_clock[length.clamp(max=top)]))

    def prefix(self, batch: dict):
        """Fused text-length prefix (B, L, d_model) and the auxiliary loss (the commitment loss of
        taste_rvq, else 0). Only the aggregating variants read the speech here."""
        text = self.text_branch(batch["text_emb"])
        if self.cfg.variant not in AGGREGATING:
            return text, torch.zeros((), device=text.device)
        if self.cfg.unit_alignment == "attention" and batch.get("codes") is not None:
            raise ValueError("train.unit_alignment attention: the codes do not carry where each token is; decode "
                             "needs the speech (unit_alignment durations codes it)")
        vectors, _, aux = self.speech(batch)
        speech = self.speech_branch(vectors)
        w = self.fusion_logits.softmax(0)
        if self.training and self.cfg.text_dropout > 0:
            keep = torch.rand(text.shape[0], 1, 1, device=text.device) >= self.cfg.text_dropout
            text = text * keep
        return w[0] * text + w[1] * speech, aux

    def frame_inputs(self, batch: dict, steps: int) -> torch.Tensor:
        """speech_frames only: (B, steps, d_model), the projected Whisper frame r for unit-stream input r
        (the input at TASK, r = 0, predicts the unit of frame 0), zero past an item's last frame."""
        mid, last, frame_len = batch["mid"], batch["last"], batch["frame_len"]
        feats = self.frame_proj(torch.cat([mid, last], dim=-1)[:, :steps])
        real = torch.arange(feats.shape[1], device=feats.device)[None] < frame_len[:, None]
        feats = feats * real[..., None]
        return F.pad(feats, (0, 0, 0, steps - feats.shape[1]))

    def targets(self, batch: dict) -> torch.Tensor:
        """(B, T+1): u_1 .. u_T, END per item, -100 at padding."""
        units, unit_len = batch["units"], batch["unit_len"]
        B, T = units.shape
        dev = units.device
        targets = torch.full((B, T + 1), -100, dtype=torch.long, device=dev)
        valid = torch.arange(T, device=dev)[None] < unit_len[:, None]
        targets[:, :T][valid] = units[valid].long()
        targets[torch.arange(B, device=dev), unit_len] = self.cfg.end_id
        return targets

    def forward(self, batch: dict):
        """Teacher-forced logits over [u_1 .. u_T, END] per item, and the losses.

        batch: text_emb (B, L, dq), text_len (B), mid/last (B, F, da), frame_len (B),
               units (B, T) padded with anything, unit_len (B).
        Returns logits (B, T+1, V+1), aligned with ``targets(batch)``, and a dict of losses: ``ce``, the
        mean cross-entropy per target, and ``loss``, the sum of every term to minimize (terms such as a
        commitment loss slot in beside ``ce``).
        """
        text_emb, text_len = batch["text_emb"], batch["text_len"]
        units, unit_len = batch["units"], batch["unit_len"]
        B, L, _ = text_emb.shape
        T = units.shape[1]
        dev = text_emb.device
        prefix, aux = self.prefix(batch)
        # Each item's sequence is [its L_i prefix vectors, TASK, u_1 .. u_T]; items are packed to the left
        # so every item's units start right after its own prefix (no gap for causal attention to see).
        task = self.unit_emb(torch.full((B, 1), self.cfg.task_id, device=dev))
        unit_in = self.unit_emb(units.clamp(0, self.cfg.vocab_size - 1))
        S = L + 1 + T
        if T + 1 > self.cfg.max_len or L > self.cfg.max_text:
            raise ValueError(f"{L} text tokens / {T} units exceed max_text {self.cfg.max_text} / train.max_len {self.cfg.max_len}")
        x = torch.zeros(B, S, self.cfg.d_model, device=dev)
        pos_in_seq = torch.arange(S, device=dev)[None].expand(B, S)
        is_prefix = pos_in_seq < text_len[:, None]
        x[is_prefix] = prefix[torch.arange(L, device=dev)[None].expand(B, L) < text_len[:, None]].float()
        start = text_len  # index of TASK per item
        rel = pos_in_seq - start[:, None]  # 0 at TASK, t at u_t
        is_task = rel == 0
        is_unit = (rel >= 1) & (rel <= unit_len[:, None])
        x[is_task] = task[:, 0].float()
        x[is_unit] = unit_in[(torch.arange(T, device=dev)[None] < unit_len[:, None])].float()
        if self.cfg.variant == "speech_frames":
            x[is_task | is_unit] += self.frame_inputs(batch, T + 1)[
                torch.arange(T + 1, device=dev)[None] <= unit_len[:, None]].float()
        if self.aligned:
            x[is_task | is_unit] += self.placed(prefix, batch, T + 1)[
                torch.arange(T + 1, device=dev)[None] <= unit_len[:, None]].float()
        pos = torch.where(is_prefix[..., None], self.text_pos_emb(pos_in_seq.clamp(max=self.cfg.max_text - 1)),
                          self.unit_position(rel))
        x = self.drop(x + pos)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        # Outputs at TASK, u_1 .. u_T predict u_1 .. u_T, END.
        idx = (start[:, None] + torch.arange(T + 1, device=dev)[None]).clamp(max=S - 1)
        logits = self.head(h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])))
        ce = F.cross_entropy(logits.float().transpose(1, 2), self.targets(batch), ignore_index=-100)
        if self.cfg.variant == "taste_rvq":
            return logits, {"ce": ce, "commit": aux, "loss": ce + aux}
        return logits, {"ce": ce, "loss": ce}

    def unit_position(self, rel: torch.Tensor) -> torch.Tensor:
        """Position vectors of the unit stream: ``rel`` is 0 at TASK and t at u_t."""
        clock = rel.clamp(0, self.cfg.max_len - 1)
        if self.cfg.unit_positions == "whisper_sinusoid":
            return self.unit_pos(self.unit_clock[clock])
        return self.unit_pos_emb(clock)

    @torch.no_grad()
    def generate(self, batch: dict, max_units: int | None = None, top_k: int | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Free-running units for each item of ``batch`` (its text, and its speech for taste, or its
        ``codes`` or speech for taste_rvq; no units),
        one at a time with a key/value cache, until END or ``max_units``. Greedy unless ``top_k``:
        then sampled from the ``top_k`` likeliest (``generator`` makes it repeatable). Call in eval mode.

        Each item's sequence is [its prefix, TASK, u_1 ..] as in ``forward``; shorter prefixes are padded
        at the end and the padding is masked out of every later position's attention. Without
        ``max_units`` each item stops at ``cfg.unit_cap`` of its text length.
        """
        text_emb, text_len = batch["text_emb"], batch["text_len"]
        B, L, _ = text_emb.shape
        dev = text_emb.device
        limit = (self.cfg.unit_cap(text_len) if max_units is None
                 else torch.full_like(text_len, min(max_units, self.cfg.max_len - 1)))
        max_units = int(limit.max())
        prefix, _ = self.prefix(batch)
        pos = torch.arange(L + 1, device=dev)[None].expand(B, L + 1)
        is_prefix = pos < text_len[:, None]
        x = torch.zeros(B, L + 1, self.cfg.d_model, device=dev)
        x[is_prefix] = prefix[is_prefix[:, :L]].float()
        x[torch.arange(B, device=dev), text_len] = self.unit_emb.weight[self.cfg.task_id].float()
        frames = self.frame_inputs(batch, max_units + 1) if self.cfg.variant == "speech_frames" else None
        if self.aligned:
            frames = self.placed(prefix, batch, max_units + 1).float()
        if frames is not None:
            x[torch.arange(B, device=dev), text_len] += frames[:, 0].float()
        x = x + torch.where(is_prefix[..., None], self.text_pos_emb(pos.clamp(max=self.cfg.max_text - 1)),
                            self.unit_position(torch.zeros_like(pos)))
        capacity = L + 1 + max_units
        # The prefix and TASK, then every later position (all real): sliced to the length so far.
        valid = torch.cat([pos <= text_len[:, None], torch.ones(B, max_units, dtype=torch.bool, device=dev)], dim=1)
        caches = [{"capacity": capacity} for _ in self.blocks]
        seen = L + 1

        def run(h):
            for block, cache in zip(self.blocks, caches):
                h = block(h, key_mask=valid[:, :seen], cache=cache)
            return self.head(self.ln_f(h))

        logits = run(x)[torch.arange(B, device=dev), text_len]  # at TASK: predicts u_1
        steps, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(1, max_units + 1):
            logits = logits.float() / temperature
            if top_k is None:
                nxt = logits.argmax(-1)
            else:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            steps.append(nxt.masked_fill(done, self.cfg.end_id))
            done |= (nxt == self.cfg.end_id) | (t >= limit)
            if done.all() or t == max_units:
                break
            h = self.unit_emb(nxt.clamp(max=self.cfg.vocab_size - 1))[:, None] + self.unit_position(
                torch.full((B, 1), t, device=dev))
            if frames is not None:
                h = h + frames[:, t : t + 1]
            seen += 1
            logits = run(h)[:, 0]
        units = torch.stack(steps, dim=1).cpu()  # END from an item's first END on
        return [u[: int((u == self.cfg.end_id).nonzero()[0, 0]) if (u == self.cfg.end_id).any() else len(u)].long()
                for u in units]

    @property
    def aligned(self) -> bool:
        return self.cfg.variant in AGGREGATING and self.cfg.unit_alignment != "none"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def model_args(self) -> dict:
        return asdict(self.cfg)
