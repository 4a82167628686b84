import numpy as np
import pytest
import torch

from taste_pipeline import model as model_mod
from taste_pipeline import whisper as whisper_mod
from taste_pipeline import train_params
from taste_pipeline.model import ModelConfig, NoSpeech, TasteModel

TINY_PREFIX = [50257, 50362]  # tiny.en: <|startoftranscript|> <|notimestamps|> (test_whisper_families checks the lookup)


def _batch(B=3, L=7, F=40, T=30, seed=0, dq=384):
    g = torch.Generator().manual_seed(seed)
    return {"text_emb": torch.randn(B, L, dq, generator=g), "text_len": torch.tensor([L, L - 2, 3][:B]),
            "mid": torch.randn(B, F, 384, generator=g), "last": torch.randn(B, F, 384, generator=g),
            "frame_len": torch.tensor([F, F - 10, 20][:B]), "units": torch.randint(0, 16, (B, T), generator=g),
            "unit_len": torch.tensor([T, T - 10, 10][:B]), "speaker": torch.randn(B, 256, generator=g)}


# The default run's variants as parts.
PARTS = {"taste": {"speech": "tokens"}, "text_only": {"speech": "none"}, "speech_frames": {"speech": "frames"},
         "taste_rvq": {"speech": "tokens", "squeeze": "rvq"}}


def _model(variant="taste", **kw):
    torch.manual_seed(0)
    cfg = dict(**PARTS[variant], vocab_size=16, d_model=32, n_heads=2, n_layers=2, d_ff=64, agg_layers=1,
               agg_heads=2, agg_ffn=64, dropout=0.0)
    return TasteModel(ModelConfig(**(cfg | kw))).eval()


@pytest.mark.parametrize("variant", ["taste", "text_only", "speech_frames"])
def test_future_targets_never_change_past_logits(variant):
    model, batch = _model(variant), _batch()
    logits, _ = model(batch)
    for t in (0, 5, 17):
        changed = dict(batch, units=batch["units"].clone())
        changed["units"][:, t + 1 :] = (changed["units"][:, t + 1 :] + 7) % 16
        logits2, _ = model(changed)
        # Output index i predicts unit i+1 from units <= i: outputs 0..t+1 read only u_1..u_{t+1}.
        torch.testing.assert_close(logits[:, : t + 2], logits2[:, : t + 2])
        assert not torch.allclose(logits[0, t + 2 :], logits2[0, t + 2 :])


def test_text_only_never_reads_speech_features():
    model, batch = _model("text_only"), _batch()
    assert isinstance(model.speech, NoSpeech) and not any(k.startswith("speech.") for k in model.state_dict())
    logits, _ = model(batch)
    poisoned = dict(batch, mid=torch.full_like(batch["mid"], float("nan")), last=torch.full_like(batch["last"], float("nan")))
    torch.testing.assert_close(model(poisoned)[0], logits)
    no_speech = {k: v for k, v in batch.items() if k not in ("mid", "last", "frame_len")}
    torch.testing.assert_close(model(no_speech)[0], logits)


def test_taste_depends_on_speech_but_not_on_padded_frames():
    model, batch = _model("taste"), _batch()
    logits, _ = model(batch)
    other = dict(batch, mid=batch["mid"].flip(0), last=batch["last"].flip(0))
    assert not torch.allclose(model(other)[0][0], logits[0])
    padded = dict(batch, mid=batch["mid"].clone(), last=batch["last"].clone())
    padded["mid"][1, 30:] = 1e3  # item 1 has 30 real frames
    padded["last"][1, 30:] = -1e3
    torch.testing.assert_close(model(padded)[0], logits)


def test_the_topline_reads_frame_r_at_unit_input_r_and_never_a_later_frame():
    """speech_frames: the output predicting the unit of frame r sees frames 0..r, nothing later, and
    nothing past an item's last real frame."""
    model, batch = _model("speech_frames"), _batch()
    logits, _ = model(batch)
    for r in (0, 6, 19):
        changed = dict(batch, mid=batch["mid"].clone())
        changed["mid"][:, r] += 5.0
        logits2, _ = model(changed)
        torch.testing.assert_close(logits[:, :r], logits2[:, :r])  # outputs before r: untouched
        assert not torch.allclose(logits[0, r], logits2[0, r])  # output r reads frame r
    padded = dict(batch, last=batch["last"].clone())
    padded["last"][2, 20:] = 1e3  # item 2 has 20 real frames
    torch.testing.assert_close(model(padded)[0], logits)


@pytest.mark.parametrize("alignment", ["none", "durations"])
def test_tastes_decoder_never_sees_frame_rate_features(monkeypatch, alignment):
    """taste's speech reaches the decoder only as one vector per text token (and, with unit_alignment
    durations, one duration per token): with those held fixed, no change to the frames changes a logit."""
    model, batch = _model("taste", unit_alignment=alignment), _batch()
    fixed = torch.randn(3, 7, 384)
    monkeypatch.setattr(model.speech, "vectors", lambda b: fixed[:, : b["text_emb"].shape[1]])
    if alignment == "durations":
        frames = torch.tensor([[5, 5, 5, 5, 5, 5, 10], [6, 6, 6, 6, 6, 0, 0], [7, 7, 6, 0, 0, 0, 0]])
        monkeypatch.setattr(model.speech.placement, "durations", lambda b, speech: frames)
    logits, _ = model(batch)
    other = dict(batch, mid=torch.randn_like(batch["mid"]), last=torch.randn_like(batch["last"]))
    torch.testing.assert_close(model(other)[0], logits)


def test_batched_equals_single_items():
    model, batch = _model("taste"), _batch()
    logits, _ = model(batch)
    targets = model.targets(batch)
    single = {"text_emb": batch["text_emb"][2:, :3], "text_len": batch["text_len"][2:], "mid": batch["mid"][2:, :20],
              "last": batch["last"][2:, :20], "frame_len": batch["frame_len"][2:], "units": batch["units"][2:, :10],
              "unit_len": batch["unit_len"][2:], "speaker": batch["speaker"][2:]}
    l1, _ = model(single)
    t1 = model.targets(single)
    torch.testing.assert_close(l1[0], logits[2, :11], atol=1e-5, rtol=1e-4)
    assert torch.equal(t1[0], targets[2, :11])


def test_targets_are_units_then_end():
    model, batch = _model("text_only"), _batch()
    targets = model.targets(batch)
    n = int(batch["unit_len"][1])
    assert torch.equal(targets[1, :n], batch["units"][1, :n])
    assert targets[1, n] == model.cfg.end_id and (targets[1, n + 1 :] == -100).all()


def _item(batch, i):
    """Item i of a batch alone, cut to its own lengths."""
    n, f, t = (int(batch[k][i]) for k in ("text_len", "frame_len", "unit_len"))
    return {"text_emb": batch["text_emb"][i : i + 1, :n], "text_len": batch["text_len"][i : i + 1],
            "mid": batch["mid"][i : i + 1, :f], "last": batch["last"][i : i + 1, :f],
            "frame_len": batch["frame_len"][i : i + 1], "units": batch["units"][i : i + 1, :t],
            "unit_len": batch["unit_len"][i : i + 1], "speaker": batch["speaker"][i : i + 1]}


@pytest.mark.parametrize("variant", ["taste", "taste_rvq"])
def test_the_loss_is_the_mean_over_every_real_target_of_the_batch(variant):
    """Padding never counts and END does: the batch's cross-entropy is its items' alone, weighted by their
    units + END; the squeeze's commitment term is added to it, and is the only other term."""
    model, batch = _model(variant), _batch()
    _, losses = model(batch)
    singles = [model(_item(batch, i))[1]["ce"] for i in range(3)]
    weights = (batch["unit_len"] + 1).float()
    torch.testing.assert_close(losses["ce"], (torch.stack(singles) * weights).sum() / weights.sum(), rtol=1e-4, atol=1e-5)
    extra = {"taste": set(), "taste_rvq": {"commit"}}[variant]
    assert set(losses) == {"ce", "loss"} | extra
    torch.testing.assert_close(losses["loss"], losses["ce"] + sum(losses[k] for k in extra))


def test_a_tokens_vector_reads_no_later_token_and_no_padding():
    """One vector per text token, each from the text up to it (the aggregator's self-attention is causal,
    as Whisper's decoder): the first tokens' vectors are the same whatever text follows or pads them."""
    model, batch = _model("taste"), _batch()
    full = model.speech.vectors(batch)
    assert full.shape == (3, 7, 384)
    short = dict(batch, text_emb=batch["text_emb"][:, :3].clone(), text_len=torch.tensor([3, 3, 3]))
    torch.testing.assert_close(model.speech.vectors(short), full[:, :3], atol=1e-5, rtol=1e-4)
    changed = dict(batch, text_emb=batch["text_emb"].clone())
    changed["text_emb"][:, 3:] = torch.randn(3, 4, 384)
    torch.testing.assert_close(model.speech.vectors(changed)[:, :3], full[:, :3], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model.speech.vectors(changed)[:, 3:], full[:, 3:])


def test_whisper_init_copies_the_decoder_and_sets_value_identity(tiny_whisper):
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=2, agg_heads=6,
                      agg_ffn=1536, dropout=0.0)
    model = TasteModel(cfg)
    agg = model.speech.aggregator
    agg.init_from_whisper(tiny_whisper, TINY_PREFIX)
    ours, theirs = agg.layers[1], tiny_whisper.model.decoder.layers[1]
    assert torch.equal(ours.encoder_attn.k_proj.weight, theirs.encoder_attn.k_proj.weight)
    assert torch.equal(ours.encoder_attn.q_proj.weight, theirs.encoder_attn.q_proj.weight)
    assert torch.equal(ours.mlp.fc1.weight, theirs.fc1.weight)
    assert torch.equal(ours.encoder_attn.v_proj.weight, torch.eye(384))
    assert torch.equal(agg.prefix[0], tiny_whisper.model.decoder.embed_tokens.weight[50257])
    too_deep = TasteModel(ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=5))
    with pytest.raises(ValueError, match="agg_layers"):
        too_deep.speech.aggregator.init_from_whisper(tiny_whisper, TINY_PREFIX)


def test_pretrained_aggregator_matches_whisper_when_keys_equal_values(tiny_whisper):
    """With K = V = the last layer and v_proj restored, our layers compute Whisper's decoder layers: the
    hidden states after each one, and what the last one's cross-attention read: a token's vector is the
    read at the position before it, where Whisper's decoder looks for the token it predicts next."""
    cfg = ModelConfig(vocab_size=16, agg_layers=4, agg_heads=6, agg_ffn=1536, dropout=0.0, agg_value_layers=1,
                      agg_freeze_alignment=False)
    agg = TasteModel(cfg).eval().speech.aggregator
    agg.init_from_whisper(tiny_whisper, TINY_PREFIX)
    dec = tiny_whisper.model.decoder
    with torch.no_grad():
        for ours, theirs in zip(agg.layers, dec.layers):
            ours.encoder_attn.v_proj.load_state_dict(theirs.encoder_attn.v_proj.state_dict())
        enc = torch.randn(1, 30, 384)
        ids = torch.tensor([[50257, 50362, 262, 3797, 3332]])
        ref = dec(input_ids=ids, encoder_hidden_states=enc, output_hidden_states=True).hidden_states
        emb = dec.embed_tokens.weight[ids[:, 2:]]
        x = torch.cat([agg.prefix[None], emb], dim=1) + agg.positions[:5]
        mask = torch.ones(1, 30, dtype=torch.bool)
        for i, (ours, want) in enumerate(zip(agg.layers, ref[1:])):
            x, read = ours(x, enc, enc, mask)
            got = dec.layer_norm(x) if i == len(agg.layers) - 1 else x  # the last of Whisper's is after its final LN
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        last = dec.layers[-1]
        h = ref[-2] + last.self_attn(last.self_attn_layer_norm(ref[-2]))[0]
        want_read = last.encoder_attn(last.encoder_attn_layer_norm(h), key_value_states=enc)[0]
        torch.testing.assert_close(agg(emb, enc, enc, mask), want_read[:, 1:-1], atol=1e-4, rtol=1e-4)


def test_context_layers_read_last_layer_values_and_are_frozen(tiny_whisper):
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1, d_ff=64, agg_layers=3, agg_value_layers=1,
                      agg_heads=6, agg_ffn=1536, dropout=0.0)
    model = TasteModel(cfg).eval()
    agg = model.speech.aggregator
    agg.init_from_whisper(tiny_whisper, TINY_PREFIX)
    layers = agg.layers
    assert not any(p.requires_grad for p in layers[0].parameters()) and not agg.positions.requires_grad
    trainable = {n for n, p in layers[2].named_parameters() if p.requires_grad}
    assert {"encoder_attn.v_proj.weight", "encoder_attn.out_proj.weight", "mlp.fc1.weight"} <= trainable
    assert not trainable & {"encoder_attn.q_proj.weight", "encoder_attn.k_proj.weight", "self_attn.q_proj.weight",
                            "encoder_attn_layer_norm.weight"}
    assert torch.equal(layers[1].encoder_attn.v_proj.weight, tiny_whisper.model.decoder.layers[1].encoder_attn.v_proj.weight)
    assert torch.equal(layers[2].encoder_attn.v_proj.weight, torch.eye(384))
    # mid reaches only the last layer: poisoning mid leaves the first two layers' attention untouched.
    b = _batch(B=1, F=40)
    mask = torch.ones(1, 40, dtype=torch.bool)
    for layer in layers:
        layer.encoder_attn.keep_weights = True
    agg(b["text_emb"], b["mid"], b["last"], mask)
    before = [layer.encoder_attn.last_weights for layer in layers]
    agg(b["text_emb"], b["mid"] * 3 + 1, b["last"], mask)
    torch.testing.assert_close(layers[1].encoder_attn.last_weights, before[1])
    torch.testing.assert_close(layers[2].encoder_attn.last_weights, before[2])  # queries come from context
    out1 = agg(b["text_emb"], b["mid"], b["last"], mask)
    out2 = agg(b["text_emb"], b["mid"] * 3 + 1, b["last"], mask)
    assert not torch.allclose(out1, out2)


def test_pretrained_aggregator_aligns_text_to_speech(tiny_whisper, tiny_tables):
    """On real speech, each token's attention peak moves forward in time with the token (at init)."""
    import numpy as np

    from taste_pipeline import tables

    w, t = tables.read_whisper(tiny_tables["whisper_path"]), tables.read_text(tiny_tables["text_path"])
    model = TasteModel(ModelConfig(vocab_size=16, agg_layers=4, agg_value_layers=1, dropout=0.0)).eval()
    agg = model.speech.aggregator
    agg.init_from_whisper(tiny_whisper, TINY_PREFIX)
    attn = agg.value_attention
    attn.keep_weights = True
    corr = []
    for i in range(w.num_rows):
        f = lambda col, tab: torch.from_numpy(tables.row_matrix(tab, col, i).astype("float32"))[None]  # noqa: E731
        mid, last, emb = f("mid", w), f("last", w), f("emb", t)
        with torch.no_grad():
            agg(emb, mid, last, torch.ones(1, mid.shape[1], dtype=torch.bool))
        peaks = attn.last_weights[0, :, 2:].mean(0).argmax(-1).numpy()[:-1]  # last token: end of speech
        corr.append(np.corrcoef(np.arange(len(peaks)), peaks)[0, 1])
    assert np.mean(corr) > 0.9, corr


def test_each_token_reads_where_its_word_is_spoken(tiny_whisper, tiny_tables, tiny_corpus):
    """Against the corpus's true word timings, at init: Whisper's decoder attends at token k-1 to token k
    (it predicts the next token), so read there most frames fall on the right word, far more than for
    tokens spread evenly; read at token k itself, they mostly fall on the word after."""
    from taste_pipeline import alignment, data, tables, text

    tokenizer, _ = text.load(whisper_mod.EMBEDDED)
    words = tables.read_words(tiny_corpus.parent / "words" / "tiny-train.parquet")
    timing = {u: (s, e) for u, s, e in zip(*(words.column(c).to_pylist() for c in ("utt_id", "start", "end")))}
    split, _ = data.load_split(**tiny_tables)
    scores = {}
    for shift in (1, 0):
        model = TasteModel(ModelConfig(vocab_size=16, agg_layers=4, agg_value_layers=1, dropout=0.0,
                                       agg_read_shift=shift)).eval()
        model.speech.aggregator.init_from_whisper(tiny_whisper, TINY_PREFIX)
        got, even = [], []
        for i, ex in split.examples(range(len(split))).items():
            w = model.speech.frame_attention(data.collate([ex]))[0].float()
            tok_word = alignment.token_words([tokenizer.decode([int(k)]) for k in ex.token_ids])
            start, end = (np.asarray(x) for x in timing[ex.utt_id])
            got.append(alignment.score(w.argmax(0).numpy(), tok_word, start, end))
            even.append(alignment.score(alignment.uniform_tokens(*w.shape), tok_word, start, end))
        scores[shift] = alignment.summarize(got)["frame_acc"]
        uniform = alignment.summarize(even)["frame_acc"]
    assert scores[1] > 0.6 and scores[1] > uniform + 0.2 and scores[0] < uniform, (scores, uniform)


@pytest.mark.parametrize("variant,kw,end_bias", [("taste", {}, 4.0), ("text_only", {}, 12.0), ("speech_frames", {}, 4.0),
                                                 ("taste", {"unit_alignment": "attention"}, 8.0),
                                                 ("taste", {"unit_alignment": "durations"}, 8.0)])
def test_cached_generation_agrees_with_the_full_forward_pass(variant, kw, end_bias):
    """Greedy units from the key/value cache are what the teacher-forced forward pass predicts on them,
    item by item in a batch of different text and speech lengths, up to END."""
    model, batch = _model(variant, **kw), _batch()
    with torch.no_grad():
        # Large random weights: the argmax then turns on small differences (a wrong position or a
        # padded key let through would change it), and a bias towards END stops some items early.
        for p in model.parameters():
            p.mul_(4.0)
        model.decoder.head.bias[model.cfg.end_id] += end_bias
    gen = model.generate(batch, max_units=25)
    assert any(len(u) < 25 for u in gen) and all(len(u) <= 25 for u in gen)
    for i, units in enumerate(gen):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        n = len(units)
        one["units"], one["unit_len"] = units[None].clone() if n else torch.zeros(1, 1, dtype=torch.long), torch.tensor([n])
        one["text_emb"] = one["text_emb"][:, : int(one["text_len"][0])]
        logits, _ = model(one)
        pred = logits[0, : n + 1].argmax(-1)
        assert torch.equal(pred[:n], units), i
        if n < 25:
            assert pred[n] == model.cfg.end_id  # it stopped where the model says END


def test_top_k_sampling_is_repeatable_and_top_1_is_greedy():
    model, batch = _model("taste"), _batch()
    greedy = model.generate(batch, max_units=12)
    top1 = model.generate(batch, max_units=12, top_k=1, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(greedy, top1))
    a, b, c = (model.generate(batch, max_units=12, top_k=8, generator=torch.Generator().manual_seed(s))
               for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(z) and torch.equal(x, z) for x, z in zip(a, c))
    assert all(int(u.max()) < model.cfg.vocab_size for u in a if len(u))  # END and TASK never emitted as units


def test_aligned_units_read_the_vector_of_the_token_the_speech_puts_there(monkeypatch):
    """unit_alignment attention: unit input r gets exactly the fused vector of the token at frame r (past
    the last frame, the last frame's token); which token that is comes from the aggregator's attention;
    decoding from codes (no speech) is refused."""
    model, batch = _model("taste", unit_alignment="attention"), _batch()
    speech = model.speech
    with torch.no_grad():  # no span clock: what remains is the placed vector alone
        speech.placement.span_since.weight.zero_()
        speech.placement.span_length.weight.zero_()
    tok = torch.stack([(torch.arange(40) // 6).clamp(max=n - 1) for n in batch["text_len"].tolist()])
    tok[0, 7] = 5  # not monotonic: the placement follows the attention, whatever it says
    monkeypatch.setattr(speech, "token_of_frame", lambda b: tok)
    prefix, _ = model.prefix(batch)
    got = speech.unit_inputs(prefix, batch, 45)
    for i, f in enumerate(batch["frame_len"].tolist()):
        want = [int(tok[i, min(r, f - 1)]) for r in range(45)]
        torch.testing.assert_close(got[i], prefix[i, want])
    monkeypatch.undo()
    model.prefix(batch)
    real = speech.token_of_frame(batch)
    assert real.shape == (3, 40) and int(real[2].max()) < 3  # item 2 has 3 text tokens
    w = speech.aggregator.value_attention.last_weights.float().mean(1)[:, 1:-1]  # token k: the query before it
    assert torch.equal(real[0], w[0].argmax(0))
    with pytest.raises(ValueError, match="codes do not carry"):
        model.prefix(dict(batch, codes=torch.zeros(3, 7, 2, dtype=torch.long)))


def test_token_spans_say_where_each_step_lies_in_its_tokens_run():
    from taste_pipeline.model import token_spans

    since, length = token_spans(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [4, 3, 3, 3, 3, 3, 4, 4, 4]]))
    assert since.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert length.tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4], [1, 5, 5, 5, 5, 5, 3, 3, 3]]


def test_aligned_units_know_where_they_lie_in_their_tokens_span(monkeypatch):
    """unit_alignment attention: the same token at every frame but split into two runs changes what
    the units see (the span clock), though the token's vector is the same."""
    model, batch = _model("taste", unit_alignment="attention"), _batch()
    one = lambda b: torch.zeros(b["mid"].shape[0], b["mid"].shape[1], dtype=torch.long)  # noqa: E731
    monkeypatch.setattr(model.speech, "token_of_frame", one)
    whole, _ = model(batch)

    def split(b):
        t = one(b)
        t[:, 10:] = 1
        return t

    monkeypatch.setattr(model.speech, "token_of_frame", split)
    two, _ = model(batch)
    assert not torch.allclose(two[0, :10], whole[0, :10])  # frames 0..9: same token, a shorter span
    prefix, _ = model.prefix(batch)
    p = model.speech.placement
    clock = p.span_clock
    got = model.speech.unit_inputs(prefix, batch, 12) - prefix[:, :1]
    # step 3 of a 10-step run, step 3 of a 30-step run (item 0: 40 frames) vs one 40-step run
    torch.testing.assert_close(got[0, 3], p.span_since(clock[3]) + p.span_length(clock[10]))
    torch.testing.assert_close(model.speech.placement(prefix, batch, 12, model.speech)[0, 11] - prefix[0, 1],
                               p.span_since(clock[1]) + p.span_length(clock[30]))


@pytest.mark.parametrize("alignment", ["attention", "durations"])
def test_an_aligned_input_does_not_depend_on_how_many_steps_are_asked_for(alignment):
    """What aligned unit input r sees is the same whether fewer steps than frames are asked for
    (free-running, stopped early), just as many (training) or far more (generate pads to max_units)."""
    model, batch = _model("taste", unit_alignment=alignment), _batch()
    prefix, _ = model.prefix(batch)
    long = model.speech.unit_inputs(prefix, batch, 200)
    for steps in (12, 41):
        torch.testing.assert_close(model.speech.unit_inputs(prefix, batch, steps), long[:, :steps])


def test_durations_lay_the_tokens_end_to_end_in_text_order(monkeypatch):
    """unit_alignment durations: token i holds the steps from the sum of the durations before it to the
    sum up to it (a token of 0 frames holds none); the speech ends at the sum of all."""
    model, batch = _model("taste", unit_alignment="durations"), _batch()
    frames = torch.tensor([[2, 3, 0, 1, 0, 0, 4], [1, 1, 1, 1, 2, 0, 0], [5, 5, 5, 0, 0, 0, 0]])
    monkeypatch.setattr(model.speech.placement, "durations", lambda b, speech: frames)
    idx, end = model.speech.placement.step_tokens(batch, 12, model.speech)
    assert idx[0].tolist() == [0, 0, 1, 1, 1, 3, 6, 6, 6, 6, 6, 6]
    assert idx[1].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]  # item 1 has 5 tokens: the last one's past the end
    assert idx[2].tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert end.tolist() == [10, 6, 15]


def test_durations_are_the_frames_the_attention_gives_each_token():
    """What each token's attention holds, counted: they sum to the item's frames; codes carry them."""
    model, batch = _model("taste", unit_alignment="durations"), _batch()
    model.prefix(batch)
    d = model.speech.placement.durations(batch, model.speech)
    tok = model.speech.token_of_frame(batch)
    assert d.tolist()[2][:3] == [int((tok[2, :20] == k).sum()) for k in range(3)]
    torch.testing.assert_close(d.sum(1), batch["frame_len"])
    assert (d[1, 5:] == 0).all() and (d[2, 3:] == 0).all()
    codes = torch.zeros(3, 7, 5, dtype=torch.long)
    codes[..., -1] = 4
    assert (model.speech.placement.durations(dict(batch, codes=codes), model.speech) == 4).all()



def test_the_parts_registries_are_the_choices_params_accept():
    """A new part is one class, one registry entry and its name among the params' choices."""
    assert tuple(model_mod.SPEECH) == train_params.SPEECH
    assert tuple(model_mod.SQUEEZES) == train_params.SQUEEZES
    assert tuple(model_mod.PLACEMENTS) == train_params.UNIT_ALIGNMENTS


def test_forward_and_generate_do_not_branch_on_a_variant_name():
    """The model has no notion of variant names: its config holds parts, and a squeeze needs token vectors."""
    import dataclasses

    assert "variant" not in {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(train_params.ParamError, match="train.squeeze"):
        TasteModel(ModelConfig(vocab_size=16, speech="frames", squeeze="rvq"))


def test_oracle_durations_place_text_alone_on_the_unit_clock():
    """unit_alignment oracle, with text alone: the decoder reads the batch's true durations (no speech);
    other durations change its logits, speech features do not, and a batch without them is refused."""
    model, batch = _model("text_only", unit_alignment="oracle"), _batch()
    batch["durations"] = torch.tensor([[2, 3, 0, 1, 0, 0, 4], [1, 1, 1, 1, 2, 0, 0], [5, 5, 5, 0, 0, 0, 0]])
    logits, _ = model(batch)
    idx, end = model.speech.placement.step_tokens(batch, 12, model.speech)
    assert idx[0].tolist() == [0, 0, 1, 1, 1, 3, 6, 6, 6, 6, 6, 6] and end.tolist() == [10, 6, 15]
    poisoned = dict(batch, mid=torch.full_like(batch["mid"], float("nan")), last=torch.full_like(batch["last"], float("nan")))
    torch.testing.assert_close(model(poisoned)[0], logits)
    moved = dict(batch, durations=batch["durations"].roll(1, dims=1))
    assert not torch.allclose(model(moved)[0][0], logits[0])
    with pytest.raises(ValueError, match="no true durations"):
        model({k: v for k, v in batch.items() if k != "durations"})
    with pytest.raises(train_params.ParamError, match="oracle"):
        train_params.ModelArgs(speech="frames", unit_alignment="oracle").check()
