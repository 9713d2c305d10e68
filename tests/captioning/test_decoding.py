import pytest
import torch

from llm_caption.captioning.decoding import EOS, beam_search, decode_batched, greedy_decode, ids_to_words
from llm_caption.captioning.models import DECODERS, build_decoder, caption_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "show_tell": {"embed_dim": 24, "hidden_dim": 48, "dropout": 0.0},
    "show_attend_tell": {"embed_dim": 24, "hidden_dim": 48, "attention_dim": 24, "dropout": 0.0},
    "cnn_transformer": {"d_model": 24, "nhead": 2, "num_layers": 1, "dim_feedforward": 48, "dropout": 0.0},
}
VOCAB, DIM, P = 16, 12, 6


def _trained(arch):
    """A decoder trained briefly to emit varied, EOS-terminated captions of different lengths."""
    torch.manual_seed(1)
    feats = torch.randn(8, P, DIM)
    tokens = torch.zeros(8, 9, dtype=torch.long)
    tokens[:, 0] = 1
    for i in range(8):
        n = 2 + i % 5
        tokens[i, 1:1 + n] = 4 + (torch.arange(n) * (i + 1)) % (VOCAB - 4)
        tokens[i, 1 + n] = EOS
    model = build_decoder(arch, VOCAB, DIM, **TINY[arch])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = caption_loss(model, feats, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), feats


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_beam_one_equals_greedy(arch):
    model, feats = _trained(arch)
    feats = torch.cat([feats, torch.randn(8, P, DIM)])  # seen and unseen images
    greedy = greedy_decode(model, feats, max_len=12)
    beam = beam_search(model, feats, beam_size=1, max_len=12)
    assert greedy.tokens == beam.tokens
    assert len({tuple(t) for t in greedy.tokens}) > 1


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_batched_beam_search_matches_one_image_at_a_time(arch):
    model, feats = _trained(arch)
    batched = beam_search(model, feats, beam_size=3, max_len=12, length_penalty=0.7)
    single = [beam_search(model, feats[i: i + 1], beam_size=3, max_len=12, length_penalty=0.7).tokens[0]
              for i in range(feats.shape[0])]
    assert batched.tokens == single
    assert all(EOS not in t for t in batched.tokens)


def test_beam_search_never_scores_below_greedy():
    model, feats = _trained("show_tell")

    def logprob(tokens_list):
        out = []
        for i, toks in enumerate(tokens_list):
            seq = torch.tensor([[1, *toks, EOS]])
            logits, _ = model(feats[i: i + 1], seq[:, :-1])
            lp = torch.log_softmax(logits, -1).gather(2, seq[:, 1:].unsqueeze(2)).sum()
            out.append(float(lp))
        return out

    with torch.no_grad():
        greedy = logprob(greedy_decode(model, feats, 12).tokens)
        beam = logprob(beam_search(model, feats, beam_size=4, max_len=12).tokens)
    assert all(b >= g - 1e-4 for b, g in zip(beam, greedy))


def test_attention_maps_per_generated_word():
    model, feats = _trained("show_attend_tell")
    for result in (greedy_decode(model, feats, 12, return_alphas=True),
                   beam_search(model, feats, 3, 12, 0.7, return_alphas=True)):
        assert len(result.alphas) == feats.shape[0]
        for toks, alpha in zip(result.tokens, result.alphas):
            assert alpha.shape == (len(toks), P)
            torch.testing.assert_close(alpha.sum(-1), torch.ones(len(toks)))
    chunked = decode_batched(model, feats.half(), batch_size=3, beam_size=3, max_len=12, length_penalty=0.7)
    assert chunked.tokens == beam_search(model, feats.half().float(), 3, 12, 0.7).tokens


def test_ids_to_words_stops_at_eos():
    itos = ["<pad>", "<sos>", "<eos>", "<unk>", "a", "dog"]
    assert ids_to_words([1, 4, 5, 2, 4], itos) == ["a", "dog"]
