"""The TASTE model from parts, readable in one sitting: text branch -> speech part -> causal unit decoder.

A variant is a choice of parts (``train`` params, per variant in ``train.variants``):

- ``speech``, what conditions the decoder on speech: ``none`` (text alone, the baseline), ``tokens``
  (TASTE: the aggregator gives one vector per text token, fused with the text branch) or ``frames``
  (the topline, TASTE's "encoder only, 50 Hz": the Whisper frame of each unit's time, added to the unit
  stream; it bounds what speech can add).
- ``squeeze`` (with tokens), what the vectors are squeezed through: ``none`` or ``rvq`` (TASTE's
  tokenizer: a residual VQ, a few discrete codes per text token from which alone the decoder rebuilds
  the units; ``encode``, and ``generate`` with ``codes``).
- ``unit_alignment`` (with tokens), how the decoder is told where the tokens lie: ``none`` (TASTE: it
  finds its place in the text itself), ``attention`` (unit input r also gets the fused vector of the
  token that the aggregator's attention puts at frame r) or ``durations`` (the same, coded per token as
  its duration in frames, which the rvq squeeze sends as one more code); ``oracle`` (with tokens or
  none) lays the tokens on the unit clock by their true durations, from the corpus's word timings.
- ``speaker``, what the decoder is told of the voice: ``embedding`` (TASTE, CosyVoice's LM: the
  utterance's speaker embedding as the decoder's first input, before the text) or ``none``.

Aggregator: Whisper-decoder-shaped layers whose cross-attention takes its queries from text tokens,
its keys from the last Whisper encoder layer and its values from a middle layer, with key-padding
masks; one output vector per text token. It can start from the pretrained Whisper decoder (whose
cross-attention already aligns text to audio); then the value projection starts as identity, because
the values come from another layer than the one it was trained on.

Fusion: TASTE's weighted sum of a text branch and a speech branch with two softmax-normalised weights.

Decoder: a causal transformer over [speaker, fused text-length prefix, TASK, u_1 .. u_T] that predicts
u_1 .. u_T, END (the shape of CosyVoice's text-to-token LM), with a key/value cache for generation.
Loss only on the unit positions. Adding a part is one class and one registry entry (and its name in
``train_params``' choices; a test keeps the two equal).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train_params import ModelArgs, ParamError

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

    vocab_size: int = 128  # target units; END and TASK are added after them
    d_query: int = 384  # text embedding width
    d_audio: int = 384  # Whisper encoder width (keys and values)
    agg_heads: int = 6
    agg_ffn: int = 1536
    max_text: int = 448  # aggregator positions, Whisper's prefix included
    agg_prefix: int = 2  # tokens before the text: 2 for English-only Whisper (and fresh), 4 for multilingual
    d_speaker: int = 256  # speaker embedding width (the speaker table's: Resemblyzer 256, CAM++ 192)
    # Token k's vector is what the query this many positions before it read. Whisper's decoder, trained to
    # predict the next token, attends at token k-1 to where token k is spoken (openai-whisper's word
    # timestamps read it there too): on the embedded test split the frozen attention put 84 % of the
    # frames on the right word read this way, 13 % read at token k itself. 0: checkpoints made before.
    agg_read_shift: int = 1
    # The most units per text token of any training utterance: free-running generation stops an item at
    # GENERATE_SLACK times that many units per token of its text (what a user has; never the reference
    # length). 0: not known, the cap is max_len.
    max_units_per_token: float = 0.0

    @classmethod
    def build(cls, args: ModelArgs, **rest) -> "ModelConfig":
        """The config for ``args`` (any ModelArgs, the train params included) and the other fields."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(ModelArgs)}, **rest)

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


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) True where a position is inside its item's length."""
    return torch.arange(size, device=lengths.device)[None] < lengths[:, None]


# ---------------------------------------------------------------------------------------------------
# Layers


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

    def forward(self, x, keys=None, values=None, key_mask=None, causal=False, cache: dict | None = None):
        """``cache`` (self-attention while generating): keys and values of earlier positions, written in
        place into buffers of ``cache["capacity"]`` positions (growing them by concatenation copied the
        whole cache every step: generation went quadratic); ``x`` then holds only the new positions,
        which come after them."""
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
        return self.out_proj(y.transpose(1, 2).reshape(B, Lq, D))


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

    def forward(self, x, keys, values, frame_mask):
        """The new hidden state and what the cross-attention read."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal=True)
        read = self.encoder_attn(self.encoder_attn_layer_norm(x), keys, values, key_mask=frame_mask)
        x = x + read
        return x + self.mlp(self.final_layer_norm(x)), read


class Aggregator(nn.Module):
    """Text-token queries attend over Whisper frames: (B, L, d_query) -> (B, L, d_audio), a token's
    vector being what the value layers' cross-attention read for it (over middle-layer frames)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_audio
        self.in_proj = nn.Identity() if cfg.d_query == d else nn.Linear(cfg.d_query, d)
        # Whisper's task prefix (``whisper.prefix_tokens``): the context its decoder was trained to read text in.
        self.num_prefix = cfg.agg_prefix
        self.first_read = cfg.agg_prefix - cfg.agg_read_shift  # the position whose read is token 0's
        if not 0 <= self.first_read <= cfg.agg_prefix:
            raise ValueError(f"agg_read_shift {cfg.agg_read_shift} does not fit a prefix of {cfg.agg_prefix} tokens")
        self.prefix = nn.Parameter(torch.randn(self.num_prefix, d) * 0.02)
        self.positions = nn.Parameter(torch.randn(cfg.max_text, d) * 0.02)  # prefix included
        self.layers = nn.ModuleList(AggregatorLayer(d, cfg.agg_heads, cfg.agg_ffn, d, cfg.dropout)
                                    for _ in range(cfg.agg_layers))
        self.value_layers = cfg.agg_value_layers
        self.freeze_alignment = cfg.agg_freeze_alignment

    def forward(self, text_emb, mid, last, frame_mask):
        B, L, _ = text_emb.shape
        x = torch.cat([self.prefix.expand(B, -1, -1), self.in_proj(text_emb)], dim=1)
        if L + self.num_prefix > len(self.positions):
            raise ValueError(f"{L} text tokens exceed the aggregator's {len(self.positions) - self.num_prefix} positions")
        x = x + self.positions[: L + self.num_prefix]
        first_mid = len(self.layers) - self.value_layers
        reads = []
        for i, layer in enumerate(self.layers):
            value_layer = i >= first_mid
            x, read = layer(x, last, mid if value_layer else last, frame_mask)
            if value_layer:
                reads.append(read)
        return self.token_rows(torch.stack(reads).sum(0))

    def token_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Of a (B, prefix + L, ...) tensor over the query positions, the L rows that are the text tokens'."""
        return t[:, self.first_read : self.first_read + t.shape[1] - self.num_prefix]

    @property
    def value_attention(self) -> Attention:
        """The last value layer's cross-attention: where each token reads (its weights, kept on request)."""
        return self.layers[-1].encoder_attn

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
        if self.freeze_alignment:
            # Trained on a small corpus, what decides where tokens attend drifts to a few "sink" frames
            # for every token and the vectors become one utterance summary: it stays Whisper's, and
            # only what a token reads (v_proj, out_proj, MLP) is learned.
            self.prefix.requires_grad_(False)
            self.positions.requires_grad_(False)
            first_mid = len(self.layers) - self.value_layers
            for i, layer in enumerate(self.layers):
                for name, p in layer.named_parameters():
                    reads_values = name.startswith(("encoder_attn.v_proj", "encoder_attn.out_proj", "mlp", "final_layer_norm"))
                    p.requires_grad_(i >= first_mid and reads_values)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, key_bias=True)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask=None, cache: dict | None = None):
        x = x + self.drop(self.attn(self.ln1(x), key_mask=key_mask, causal=True, cache=cache))
        return x + self.mlp(self.ln2(x))


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


# ---------------------------------------------------------------------------------------------------
# Squeeze: what the token vectors pass through


class NoSqueeze(nn.Module):
    """The vectors as they are."""

    levels, codebook_size, bits_per_token = 0, 0, 0.0

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, vectors, text_mask):
        return vectors, None, {}


class ResidualSqueeze(nn.Module):
    """A residual VQ (vector-quantize-pytorch, the library TASTE vendored): EMA codebooks, k-means
    initialisation, dead-code replacement, the commitment loss, quantizer dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.levels, self.codebook_size = cfg.rvq_levels, cfg.rvq_codebook_size
        self.bits_per_token = cfg.rvq_levels * math.log2(cfg.rvq_codebook_size)
        self.quantizer = ResidualVQ(
            dim=cfg.d_audio, num_quantizers=cfg.rvq_levels, codebook_size=cfg.rvq_codebook_size,
            decay=cfg.rvq_decay, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=cfg.rvq_dead_code,
            commitment_weight=cfg.rvq_commitment, quantize_dropout=cfg.rvq_dropout)

    def forward(self, vectors, text_mask):
        """(quantized vectors, codes (B, L, levels), {"commit": loss}). Outside autocast: the nearest-code
        search and the EMA updates need float32. Padded tokens neither train the codebooks nor count in
        the loss; their codes are -1 (so are the levels quantizer dropout skipped)."""
        with torch.autocast(vectors.device.type, enabled=False):
            q, codes, commit = self.quantizer(vectors.float(), mask=text_mask)
        return q, codes.masked_fill(~text_mask[..., None], -1), {"commit": commit.sum()}

    def decode(self, codes, text_mask):
        return self.quantizer.get_output_from_indices(codes.clamp(min=0)) * text_mask[..., None]

    @property
    def ready(self) -> bool:
        """Whether every level's codebook has been k-means-initialised."""
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


SQUEEZES = {"none": NoSqueeze, "rvq": ResidualSqueeze}


# ---------------------------------------------------------------------------------------------------
# Placement: how the decoder is told where the tokens lie


class NoPlacement(nn.Module):
    """TASTE: the decoder finds its place in the text itself."""

    coded, keeps_weights, reads_speech = False, False, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, prefix, batch, steps, speech):
        return None


class SpanPlacement(nn.Module):
    """Unit input r also gets the fused vector of the text token at step r (the last token past the
    speech's end) and where r lies in that token's span (frames since it began, its length), on
    Whisper's sinusoid basis. Subclasses say which token is at each step and where the speech ends."""

    coded, keeps_weights, reads_speech = False, True, True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len = cfg.max_len
        self.register_buffer("span_clock", sinusoids(cfg.max_len, cfg.d_audio), persistent=False)
        self.span_since = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)
        self.span_length = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)

    def forward(self, prefix, batch, steps, speech):
        """(B, steps, d_model) for the unit-stream inputs."""
        # Spans are measured over all of the speech, however few steps are asked for, and steps past the
        # last frame are a run of their own of length 0 (no span): so every step's input is the same in
        # training (the batch's units), in evaluation and in generate.
        idx, end = self.step_tokens(batch, max(steps, int(self.speech_end(batch, speech).max()) + 1), speech)
        r = torch.arange(idx.shape[1], device=idx.device)[None]
        past = r >= end[:, None]
        since, length = token_spans(idx.masked_fill(past, -1))
        idx, since, length = idx[:, :steps], since[:, :steps], length.masked_fill(past, 0)[:, :steps]
        top = self.max_len - 1
        return (prefix.gather(1, idx[..., None].expand(-1, -1, prefix.shape[-1]))
                + self.span_since(self.span_clock[since.clamp(max=top)])
                + self.span_length(self.span_clock[length.clamp(max=top)]))


class AttentionPlacement(SpanPlacement):
    """The token at frame r is the one the value layer's attention puts there (read off the speech:
    decoding from codes alone cannot do this)."""

    def speech_end(self, batch, speech):
        return batch["frame_len"]

    def step_tokens(self, batch, steps, speech):
        """(the text token at unit-stream step r (B, steps), the last token's past the speech's end;
        where the speech ends (B,), in steps)."""
        tok = speech.token_of_frame(batch)
        r = torch.arange(steps, device=tok.device)[None]
        f = torch.minimum(r, (batch["frame_len"] - 1)[:, None]).clamp(min=0)
        return tok.gather(1, f.clamp(max=tok.shape[1] - 1)), batch["frame_len"]


class DurationPlacement(SpanPlacement):
    """Each token's span is its duration (the frames the attention gives it, at most DURATION_MAX), the
    tokens laid end to end in text order; a squeeze sends the duration as one more code per token."""

    coded = True

    def durations(self, batch, speech) -> torch.Tensor:
        """(B, L) the frames ``token_of_frame`` gives each text token, at most DURATION_MAX; 0 at
        padding. From the batch's duration codes when it has codes."""
        if batch.get("codes") is not None:
            return batch["codes"][..., -1].clamp(min=0)
        tok = speech.token_of_frame(batch)
        real = lengths_mask(batch["frame_len"], tok.shape[1])
        counts = torch.zeros(tok.shape[0], batch["text_emb"].shape[1], dtype=torch.long, device=tok.device)
        return counts.scatter_add_(1, tok, real.long()).clamp(max=DURATION_MAX)

    def speech_end(self, batch, speech):
        return self.durations(batch, speech).sum(1)

    def step_tokens(self, batch, steps, speech):
        # Token i holds the steps from the sum of the durations before it to the sum up to it (a token
        # of 0 frames holds none).
        ends = self.durations(batch, speech).cumsum(1)
        r = torch.arange(steps, device=ends.device)[None]
        idx = torch.searchsorted(ends, r.expand(ends.shape[0], -1).contiguous(), right=True)
        return torch.minimum(idx, (batch["text_len"] - 1).clamp(min=0)[:, None]), ends[:, -1]


class OraclePlacement(DurationPlacement):
    """Each token's span is its true duration (the corpus's word timings split over each word's tokens,
    the batch's ``durations``), laid end to end: the best that timing alone can tell the decoder. Reads
    no speech, so text alone can take it; not coded (decoding needs a corpus's word timings)."""

    coded, keeps_weights, reads_speech = False, False, False

    def durations(self, batch, speech) -> torch.Tensor:
        if batch.get("durations") is None:
            raise ValueError("train.unit_alignment oracle: the batch has no true durations (the synthesize "
                             "stage's word timings, --words)")
        return batch["durations"].clamp(min=0, max=DURATION_MAX)


PLACEMENTS = {"none": NoPlacement, "attention": AttentionPlacement, "durations": DurationPlacement,
              "oracle": OraclePlacement}


# ---------------------------------------------------------------------------------------------------
# Speech: what conditions the decoder


class NoSpeech(nn.Module):
    """Text alone: the model never reads speech features (a placement that reads none, the oracle, may
    still put the text tokens on the unit clock)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        placement = PLACEMENTS[cfg.unit_alignment]
        self.placement = placement(cfg) if not placement.reads_speech else None

    def prefix(self, text, batch):
        return text, {}

    def unit_inputs(self, prefix, batch, steps):
        return None if self.placement is None else self.placement(prefix, batch, steps, self)


class TokenSpeech(nn.Module):
    """TASTE: one speech vector per text token (the aggregator), through the squeeze, fused with the
    text branch; the placement may also put the tokens' vectors on the unit clock."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.aggregator = Aggregator(cfg)
        self.speech_branch = nn.Linear(cfg.d_audio, cfg.d_model)
        self.fusion_logits = nn.Parameter(torch.zeros(2))  # softmax -> equal weights at the start
        self.squeeze = SQUEEZES[cfg.squeeze](cfg)
        self.placement = PLACEMENTS[cfg.unit_alignment](cfg)
        if self.placement.keeps_weights:
            self.aggregator.value_attention.keep_weights = True

    @property
    def code_width(self) -> int:
        """Codes per text token: the squeeze's levels, then the duration code if the placement sends one."""
        return self.squeeze.levels + (self.placement.coded and self.squeeze.levels > 0)

    @property
    def bits_per_token(self) -> float:
        return self.squeeze.bits_per_token + (DURATION_BITS if self.code_width > self.squeeze.levels else 0)

    def vectors(self, batch):
        """(B, L, d_audio) one vector per text token, before the squeeze."""
        frame_mask = lengths_mask(batch["frame_len"], batch["mid"].shape[1])
        return self.aggregator(batch["text_emb"], batch["mid"], batch["last"], frame_mask)

    def squeezed(self, batch):
        """(squeezed vectors, codes or None, auxiliary losses). A batch with ``codes`` is decoded from them
        instead of from the Whisper states."""
        text_mask = lengths_mask(batch["text_len"], batch["text_emb"].shape[1])
        if batch.get("codes") is not None:
            if not self.squeeze.levels:
                raise ValueError("a model without a squeeze has no codes to decode")
            codes = batch["codes"]
            if codes.shape[-1] != self.code_width:
                raise ValueError(f"{codes.shape[-1]} codes per token; this model takes {self.code_width}")
            return self.squeeze.decode(codes[..., : self.squeeze.levels], text_mask), codes, {}
        return self.squeeze(self.vectors(batch), text_mask)

    def encode(self, batch) -> torch.Tensor:
        """The codes of each text token, (B, L, ``code_width``): the squeeze's levels, then (durations) the
        token's duration in frames; -1 at padding. Call in eval mode."""
        if not self.squeeze.levels:
            raise ValueError("this model has no quantizer (squeeze: none): only squeeze: rvq gives codes")
        codes = self.squeezed(batch)[1]
        if self.code_width == codes.shape[-1]:
            return codes
        durations = self.placement.durations(batch, self)[..., None]
        return torch.cat([codes, durations.masked_fill(codes[..., :1] < 0, -1)], dim=-1)

    def prefix(self, text, batch):
        """The fused text-length prefix (B, L, d_model) and the squeeze's auxiliary losses."""
        if isinstance(self.placement, AttentionPlacement) and batch.get("codes") is not None:
            raise ValueError("train.unit_alignment attention: the codes do not carry where each token is; decode "
                             "needs the speech (unit_alignment durations codes it)")
        vectors, _, aux = self.squeezed(batch)
        w = self.fusion_logits.softmax(0)
        return w[0] * text + w[1] * self.speech_branch(vectors), aux

    def unit_inputs(self, prefix, batch, steps):
        return self.placement(prefix, batch, steps, self)

    def token_of_frame(self, batch) -> torch.Tensor:
        """After ``prefix``: (B, F) the text token that the value layer's attention (mean over heads) puts
        at each frame, the one attending most to it."""
        w = self.aggregator.token_rows(self.aggregator.value_attention.last_weights.float().mean(1))
        real = lengths_mask(batch["text_len"], w.shape[1])
        return w.masked_fill(~real[..., None], float("-inf")).argmax(1)

    @torch.no_grad()
    def frame_attention(self, batch) -> torch.Tensor:
        """(B, L, F) where each text token reads: the value layer's attention, mean over heads. Leaves the
        layer as it found it (an aligned model needs its weights kept)."""
        attn = self.aggregator.value_attention
        kept = attn.keep_weights, attn.last_weights
        attn.keep_weights = True
        try:
            self.vectors(batch)
            return self.aggregator.token_rows(attn.last_weights.mean(1))
        finally:
            attn.keep_weights, attn.last_weights = kept


class FrameSpeech(nn.Module):
    """The topline: at unit-stream input r the Whisper frame r (mid and last layers, projected); the input
    at TASK (r = 0) predicts the unit of frame 0. Zero past an item's last frame."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.frame_proj = nn.Linear(2 * cfg.d_audio, cfg.d_model)

    def prefix(self, text, batch):
        return text, {}

    def unit_inputs(self, prefix, batch, steps):
        feats = self.frame_proj(torch.cat([batch["mid"], batch["last"]], dim=-1)[:, :steps])
        feats = feats * lengths_mask(batch["frame_len"], feats.shape[1])[..., None]
        return F.pad(feats, (0, 0, 0, steps - feats.shape[1]))


SPEECH = {"none": NoSpeech, "tokens": TokenSpeech, "frames": FrameSpeech}


# ---------------------------------------------------------------------------------------------------
# Speaker: what the decoder is told of the voice


class NoSpeaker(nn.Module):
    """The decoder is not told who speaks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, prefix, text_len, batch):
        return prefix, text_len


class SpeakerEmbedding(nn.Module):
    """CosyVoice's LM (and TASTE's decoder): the utterance's speaker embedding, L2-normalised and
    projected, is the first prefix vector, before the text."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_speaker, cfg.d_model)

    def forward(self, prefix, text_len, batch):
        if batch.get("speaker") is None:
            raise ValueError("train.speaker: embedding, but the batch has no speaker embeddings (the speaker "
                             "stage's table)")
        v = self.proj(F.normalize(batch["speaker"].float(), dim=-1))
        return torch.cat([v[:, None].to(prefix.dtype), prefix], dim=1), text_len + 1


SPEAKERS = {"none": NoSpeaker, "embedding": SpeakerEmbedding}


# ---------------------------------------------------------------------------------------------------
# The unit decoder


class UnitDecoder(nn.Module):
    """A causal transformer over [prefix, TASK, u_1 .. u_T] predicting u_1 .. u_T, END; ``inputs`` (B,
    T+1, d_model), when given, is added to the unit-stream inputs (TASK, u_1 ..)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unit_emb = nn.Embedding(cfg.vocab_size + 2, cfg.d_model)
        # Positions count separately in the text prefix and in the unit stream, so a unit's position is
        # its time (20 ms steps) whatever the text length. The unit clock is a learned projection of the
        # sinusoid Whisper's encoder adds to frame t, so decoder time shares a basis with the frames.
        self.text_pos_emb = nn.Embedding(cfg.max_text, cfg.d_model)
        self.register_buffer("unit_clock", sinusoids(cfg.max_len, cfg.d_audio), persistent=False)
        self.unit_pos = nn.Linear(cfg.d_audio, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size + 1)  # units + END

    def unit_position(self, rel: torch.Tensor) -> torch.Tensor:
        """Position vectors of the unit stream: ``rel`` is 0 at TASK and t at u_t."""
        return self.unit_pos(self.unit_clock[rel.clamp(0, self.cfg.max_len - 1)])

    def forward(self, prefix, text_len, units, unit_len, inputs=None):
        """Teacher-forced logits (B, T+1, V+1) at TASK, u_1 .. u_T."""
        B, L, _ = prefix.shape
        T = units.shape[1]
        dev = prefix.device
        if T + 1 > self.cfg.max_len or L > self.cfg.max_text:
            raise ValueError(f"{L} text tokens / {T} units exceed max_text {self.cfg.max_text} / train.max_len {self.cfg.max_len}")
        task = self.unit_emb(torch.full((B, 1), self.cfg.task_id, device=dev))
        unit_in = self.unit_emb(units.clamp(0, self.cfg.vocab_size - 1))
        # Each item's sequence is [its L_i prefix vectors, TASK, u_1 .. u_T]; items are packed to the left
        # so every item's units start right after its own prefix (no gap for causal attention to see).
        S = L + 1 + T
        x = torch.zeros(B, S, self.cfg.d_model, device=dev)
        pos_in_seq = torch.arange(S, device=dev)[None].expand(B, S)
        is_prefix = pos_in_seq < text_len[:, None]
        x[is_prefix] = prefix[lengths_mask(text_len, L)].float()
        rel = pos_in_seq - text_len[:, None]  # 0 at TASK, t at u_t
        is_task = rel == 0
        is_unit = (rel >= 1) & (rel <= unit_len[:, None])
        x[is_task] = task[:, 0].float()
        x[is_unit] = unit_in[lengths_mask(unit_len, T)].float()
        if inputs is not None:
            x[is_task | is_unit] += inputs[lengths_mask(unit_len + 1, T + 1)].float()
        pos = torch.where(is_prefix[..., None], self.text_pos_emb(pos_in_seq.clamp(max=self.cfg.max_text - 1)),
                          self.unit_position(rel))
        x = self.drop(x + pos)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        # Outputs at TASK, u_1 .. u_T predict u_1 .. u_T, END.
        idx = (text_len[:, None] + torch.arange(T + 1, device=dev)[None]).clamp(max=S - 1)
        return self.head(h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])))

    @torch.no_grad()
    def generate(self, prefix, text_len, limit, inputs=None, top_k: int | None = None, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Units one at a time with a key/value cache, until END or an item's ``limit`` (B,); ``inputs``
        (B, limit.max() + 1, d_model) as in ``forward``. Shorter prefixes are padded at the end and the
        padding is masked out of every later position's attention."""
        B, L, _ = prefix.shape
        dev = prefix.device
        max_units = int(limit.max())
        pos = torch.arange(L + 1, device=dev)[None].expand(B, L + 1)
        is_prefix = pos < text_len[:, None]
        x = torch.zeros(B, L + 1, self.cfg.d_model, device=dev)
        x[is_prefix] = prefix[is_prefix[:, :L]].float()
        x[torch.arange(B, device=dev), text_len] = self.unit_emb.weight[self.cfg.task_id].float()
        if inputs is not None:
            inputs = inputs.float()
            x[torch.arange(B, device=dev), text_len] += inputs[:, 0]
        x = x + torch.where(is_prefix[..., None], self.text_pos_emb(pos.clamp(max=self.cfg.max_text - 1)),
                            self.unit_position(torch.zeros_like(pos)))
        # The prefix and TASK, then every later position (all real): sliced to the length so far.
        valid = torch.cat([pos <= text_len[:, None], torch.ones(B, max_units, dtype=torch.bool, device=dev)], dim=1)
        caches = [{"capacity": L + 1 + max_units} for _ in self.blocks]
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
            if inputs is not None:
                h = h + inputs[:, t : t + 1]
            seen += 1
            logits = run(h)[:, 0]
        units = torch.stack(steps, dim=1).cpu()  # END from an item's first END on
        end = self.cfg.end_id
        return [u[: int((u == end).nonzero()[0, 0]) if (u == end).any() else len(u)].long() for u in units]


# ---------------------------------------------------------------------------------------------------
# The model


class TasteModel(nn.Module):
    """Text branch, the variant's speech part, the unit decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        if cfg.squeeze != "none" and cfg.speech != "tokens":
            raise ParamError(f"train.squeeze: {cfg.squeeze!r} squeezes token vectors, but train.speech is {cfg.speech!r}")
        self.cfg = cfg
        self.text_branch = nn.Linear(cfg.d_query, cfg.d_model)
        self.speech = SPEECH[cfg.speech](cfg)
        self.decoder = UnitDecoder(cfg)
        self.speaker = SPEAKERS[cfg.speaker](cfg)

    def prefix(self, batch: dict):
        """Fused text-length prefix (B, L, d_model) and the speech part's auxiliary losses."""
        return self.speech.prefix(self.text_branch(batch["text_emb"]), batch)

    def targets(self, batch: dict) -> torch.Tensor:
        """(B, T+1): u_1 .. u_T, END per item, -100 at padding."""
        units, unit_len = batch["units"], batch["unit_len"]
        B, T = units.shape
        dev = units.device
        targets = torch.full((B, T + 1), -100, dtype=torch.long, device=dev)
        valid = lengths_mask(unit_len, T)
        targets[:, :T][valid] = units[valid].long()
        targets[torch.arange(B, device=dev), unit_len] = self.cfg.end_id
        return targets

    def forward(self, batch: dict):
        """Teacher-forced logits over [u_1 .. u_T, END] per item, and the losses.

        batch: text_emb (B, L, dq), text_len (B), mid/last (B, F, da), frame_len (B),
               units (B, T) padded with anything, unit_len (B); or ``codes`` (B, L, code width) instead
               of the Whisper states for a squeezed model.
        Returns logits (B, T+1, V+1), aligned with ``targets(batch)``, and a dict of losses: ``ce``, the
        mean cross-entropy per target, the speech part's auxiliary terms (``commit``) and ``loss``,
        the sum of every term to minimize.
        """
        prefix, aux = self.prefix(batch)
        T = batch["units"].shape[1]
        inputs = self.speech.unit_inputs(prefix, batch, T + 1)
        prefix, prefix_len = self.speaker(prefix, batch["text_len"], batch)
        logits = self.decoder(prefix, prefix_len, batch["units"], batch["unit_len"], inputs)
        ce = F.cross_entropy(logits.float().transpose(1, 2), self.targets(batch), ignore_index=-100)
        return logits, {"ce": ce, **aux, "loss": ce + sum(aux.values()) if aux else ce}

    @torch.no_grad()
    def generate(self, batch: dict, max_units: int | None = None, top_k: int | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Free-running units for each item of ``batch`` (its text, and its speech or its ``codes``; no
        units), until END or ``max_units`` (default: each item's ``cfg.unit_cap`` of its text length).
        Greedy unless ``top_k``: then sampled from the ``top_k`` likeliest (``generator`` makes it
        repeatable). Call in eval mode."""
        text_len = batch["text_len"]
        limit = (self.cfg.unit_cap(text_len) if max_units is None
                 else torch.full_like(text_len, min(max_units, self.cfg.max_len - 1)))
        prefix, _ = self.prefix(batch)
        inputs = self.speech.unit_inputs(prefix, batch, int(limit.max()) + 1)
        prefix, prefix_len = self.speaker(prefix, text_len, batch)
        return self.decoder.generate(prefix, prefix_len, limit, inputs, top_k, temperature, generator)

    def encode(self, batch: dict) -> torch.Tensor:
        """The codes of each text token (a squeezed model): see ``TokenSpeech.encode``."""
        if not isinstance(self.speech, TokenSpeech):
            raise ValueError(f"a speech: {self.cfg.speech} model has no quantizer: only squeeze: rvq gives codes")
        return self.speech.encode(batch)

    @property
    def squeeze(self):
        """The token vectors' squeeze, or None for a model without token vectors."""
        return self.speech.squeeze if isinstance(self.speech, TokenSpeech) else None

    @property
    def bits_per_token(self) -> float:
        """Bits of speech per text token sent as codes (0 without a quantizer)."""
        return self.speech.bits_per_token if self.squeeze is not None and self.squeeze.levels else 0.0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def model_args(self) -> dict:
        return asdict(self.cfg)
