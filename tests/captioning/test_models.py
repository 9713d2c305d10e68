import pytest
import torch
import torch.nn.functional as F

from caption_fixtures import make_caption_inputs
from llm_caption.captioning.encoder import build_encoder
from llm_caption.captioning.features import extract_features
from llm_caption.captioning.models import DECODERS, build_decoder, caption_loss
from llm_caption.common import count_parameters
from llm_caption.captioning.transforms import build_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "show_tell": {"embed_dim": 32, "hidden_dim": 64, "dropout": 0.0},
    "show_attend_tell": {"embed_dim": 32, "hidden_dim": 64, "attention_dim": 32, "dropout": 0.0},
    "cnn_transformer": {"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    """Real encoder features of 10 synthetic scenes and one caption each."""
    inputs = make_caption_inputs(tmp_path_factory.mktemp("scenes"), n_images=10, image_size=64)
    images = inputs["caption_images"]
    encoder, _ = build_encoder({"name": "efficientnet_lite0"})
    feats, _, _ = extract_features(encoder, images["image_path"].tolist(),
                                   build_transform(inputs["image_transform_spec"]), batch_size=10)
    first = inputs["captions_encoded"].groupby("image_id").head(1).set_index("image_id").loc[images["image_id"]]
    tokens = torch.tensor([list(t) for t in first["token_ids"]])
    return torch.from_numpy(feats[:, 0]).float(), tokens, len(inputs["caption_vocab"]["itos"])


@torch.no_grad()
def _cross_entropy(model, feats, tokens):
    logits, _ = model(feats, tokens[:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=0))


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_each_architecture_overfits_ten_images(arch, ten_images):
    feats, tokens, vocab = ten_images
    torch.manual_seed(0)
    model = build_decoder(arch, vocab, feats.shape[-1], **TINY[arch])
    assert count_parameters(model)[0] > 0
    start = _cross_entropy(model, feats, tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = caption_loss(model, feats, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    end = _cross_entropy(model, feats, tokens)
    assert start > 2.0 and end < 0.05, (start, end)


def _transformer(vocab=20, dim=16):
    torch.manual_seed(0)
    return build_decoder("cnn_transformer", vocab, dim, **TINY["cnn_transformer"]).eval()


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = _transformer()
    feats = torch.randn(2, 4, 16)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])
    changed = tokens.clone()
    changed[:, 4:] = torch.tensor([11, 12])
    with torch.no_grad():
        a, _ = model(feats, tokens)
        b, _ = model(feats, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_transformer_incremental_steps_equal_the_full_prefix_decode():
    """``step`` attends from the new position to cached earlier positions; every step's logits are those of
    running the decoder over the whole prefix (what ``step`` did before the cache), in eval mode and with
    gradients (SCST samples through ``step``), and after a beam-style reorder of the rows."""
    torch.manual_seed(0)
    model = build_decoder("cnn_transformer", 20, 16, d_model=32, nhead=4, num_layers=3, dim_feedforward=64,
                          dropout=0.0).eval()
    feats = torch.randn(3, 5, 16)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 4], [1, 9, 8, 7, 6, 5, 4], [1, 4, 4, 12, 13, 2, 2]])
    memory = model.encode_memory(feats)
    state = model.init_state(feats)
    for t in range(tokens.shape[1]):
        logits, state, alpha = model.step(state, tokens[:, t])
        full = model.decode(memory, tokens[:, : t + 1])[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert alpha is None and logits.requires_grad
    assert torch.equal(state[1], tokens) and len(state) == 2 + 3
    assert all(c.shape == (3, tokens.shape[1], 32) for c in state[2:])
    # reorder the rows (as beam search does), then go on: the logits follow the reordered prefixes
    order = torch.tensor([2, 2, 0])
    state = model.reorder_state(state, order)
    nxt = torch.tensor([3, 7, 11])
    with torch.no_grad():
        logits, _, _ = model.step(state, nxt)
        full = model.decode(memory[order], torch.cat([tokens[order], nxt.unsqueeze(1)], dim=1))[:, -1]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_padding_changes_no_logits_of_real_tokens(arch):
    torch.manual_seed(0)
    model = build_decoder(arch, 20, 16, **TINY[arch]).eval()
    feats = torch.randn(2, 4, 16)
    real = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    padded = torch.cat([real, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, _ = model(feats, real)
        b, _ = model(feats, padded)
    torch.testing.assert_close(a, b[:, :4], rtol=1e-5, atol=1e-5)


def test_padding_mask_is_applied_in_the_transformer():
    """A padded key must be invisible: padding placed *before* the real tokens (where the causal mask alone would
    let them be seen) changes none of their logits, whatever vector sits under the padding."""
    model = _transformer()
    feats = torch.randn(1, 4, 16)
    real = torch.tensor([[1, 5, 7]])
    left_padded = torch.tensor([[0, 0, 1, 5, 7]])
    with torch.no_grad():
        model.pos.weight.zero_()  # no position signal: the real tokens see the same thing at offsets 0 and 2
        a, _ = model(feats, real)
        b, _ = model(feats, left_padded)
        model.embed.weight[0] = torch.randn(model.d_model) * 3  # another vector under the padding
        c, _ = model(feats, left_padded)
    torch.testing.assert_close(b[:, 2:], a, rtol=1e-5, atol=1e-6)
    assert torch.equal(c[:, 2:], b[:, 2:])
    assert torch.isfinite(a).all() and torch.isfinite(b[:, 2:]).all()


def test_attention_weights_are_a_distribution_per_word():
    torch.manual_seed(0)
    model = build_decoder("show_attend_tell", 20, 16, **TINY["show_attend_tell"]).eval()
    _, alphas = model(torch.randn(3, 6, 16), torch.tensor([[1, 4, 5]] * 3))
    assert alphas.shape == (3, 3, 6)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 3))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'rnn'"):
        build_decoder("rnn", 10, 4)
