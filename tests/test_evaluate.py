import numpy as np
import torch

from taste_pipeline import data, evaluate
from taste_pipeline.model import ModelConfig, TasteModel


def _examples(n=4, seed=0, units=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L, Fr = 5 + i % 2, 40
        mid = torch.randn(Fr, 384, generator=g)
        out.append(data.Example(f"0-0-{i:04d}", "0", "x", np.arange(L), torch.randn(L, 384, generator=g).half(),
                                mid.half(), mid.half(), torch.randint(0, 16, (units,), generator=g),
                                torch.ones(256)))
    return out


def _model(**kw):
    torch.manual_seed(0)
    return TasteModel(ModelConfig(**({"speech": "tokens", "vocab_size": 16, "d_model": 32, "n_heads": 2, "n_layers": 1,
                                      "d_ff": 64, "agg_layers": 1, "agg_heads": 2, "agg_ffn": 64, "dropout": 0.0} | kw))).eval()


def test_the_attention_plot_leaves_an_aligned_model_as_it_found_it():
    """An aligned model reads its last layer's attention weights in every forward: plotting the attention
    must not switch them off."""
    model, ex = _model(unit_alignment="attention"), _examples(1)
    batch = data.collate(ex)
    before, _ = model(batch)
    w = evaluate.attention(model, ex[0])
    assert w.shape == (len(ex[0].token_ids), len(ex[0].mid))
    after, _ = model(batch)
    torch.testing.assert_close(before, after)
    assert model.speech.aggregator.value_attention.keep_weights


def test_free_running_length_never_reads_the_reference_length():
    """The cap comes from the text and the training data (the model's config), not from the targets: a
    model that never says END stops at the same length whatever the reference units are."""
    model = _model(max_units_per_token=3.0)
    with torch.no_grad():
        model.decoder.head.bias[model.cfg.end_id] = -1e4  # never END
    short, long = _examples(units=10), _examples(units=200)
    runs = [evaluate.generate_all(model, ex, batch_size=4, top_k=5, seed=0) for ex in (short, long)]
    for (a, capped_a), (b, capped_b), ex in zip(*runs, short):
        assert len(a) == len(b) == model.cfg.unit_cap(torch.tensor([len(ex.token_ids)])).item()
        assert capped_a and capped_b
    assert len(runs[0][0][0]) != len(runs[0][1][0])  # 5 and 6 text tokens: each item its own cap


def test_the_cap_is_slack_times_the_training_rate_and_max_len_without_one():
    cfg = ModelConfig(vocab_size=16, max_units_per_token=4.0, max_len=100)
    assert cfg.unit_cap(torch.tensor([3, 20])).tolist() == [2 * 4 * 3 + 50, 99]
    assert ModelConfig(vocab_size=16, max_len=100).unit_cap(torch.tensor([3])).tolist() == [99]
