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


def _reference_beam_search(model, feats, beam_size, max_len, length_penalty=0.0):
    """The plain batched beam search: every state tensor (image features included) kept per beam row and
    reordered every step, the token history grown by concatenation. Returns tokens, scores and, for attention
    models, each chosen hypothesis' attention rows."""
    batch, k = feats.shape[0], beam_size
    flat = batch * k
    with torch.inference_mode():
        state = model.init_state(feats.repeat_interleave(k, dim=0))
        scores = torch.full((batch, k), float("-inf"))
        scores[:, 0] = 0.0
        prev = torch.full((flat,), 1, dtype=torch.long)
        finished = torch.zeros(flat, dtype=torch.bool)
        lengths = torch.zeros(flat)
        history = torch.zeros(flat, 0, dtype=torch.long)
        alpha_hist = None
        offsets = (torch.arange(batch) * k).unsqueeze(1)
        for _ in range(max_len):
            logits, state, alpha = model.step(state, prev)
            logp = torch.log_softmax(logits.float(), dim=-1)
            vocab = logp.shape[-1]
            logp[finished] = float("-inf")
            logp[finished, EOS] = 0.0
            scores, idx = (scores.reshape(flat, 1) + logp).reshape(batch, k * vocab).topk(k, dim=1)
            origin = (offsets + idx // vocab).reshape(-1)
            prev = (idx % vocab).reshape(-1)
            state = model.reorder_state(state, origin)
            finished, lengths = finished[origin], lengths[origin]
            history = torch.cat([history[origin], prev.unsqueeze(1)], dim=1)
            if alpha is not None:
                step_alpha = alpha[origin].unsqueeze(1)
                alpha_hist = step_alpha if alpha_hist is None else torch.cat([alpha_hist[origin], step_alpha], 1)
            lengths = lengths + (~finished).float()
            finished = finished | (prev == EOS)
            if bool(finished.all()):
                break
        normed = scores / lengths.reshape(batch, k).clamp(min=1.0) ** length_penalty if length_penalty else scores
        best = offsets.squeeze(1) + normed.argmax(dim=1)
        tokens = [row[: row.index(EOS)] if EOS in row else row for row in history[best].tolist()]
        alphas = None if alpha_hist is None else [alpha_hist[b, : len(t)] for b, t in zip(best.tolist(), tokens)]
    return tokens, normed.max(dim=1).values.tolist(), alphas


REAL = {  # the configured sizes (conf/base/parameters_caption_training.yml) and the larger default LSTM
    "show_tell": {"embed_dim": 64, "hidden_dim": 128, "dropout": 0.0},
    "show_attend_tell": {"embed_dim": 128, "hidden_dim": 256, "attention_dim": 128, "feature_proj": 256,
                         "dropout": 0.0},
    "cnn_transformer": {"d_model": 128, "nhead": 4, "num_layers": 2, "dim_feedforward": 256, "dropout": 0.0},
}


def _random(arch, vocab=600, feature_dim=320, sharpen=20.0, eos_bias=1.0, seed=0, **overrides):
    """An untrained decoder, its word distributions sharpened and ``<eos>`` favoured (or not): near-ties
    between hypotheses and rows that finish."""
    torch.manual_seed(seed)
    model = build_decoder(arch, vocab, feature_dim, **{**REAL[arch], **overrides}).eval()
    with torch.no_grad():
        model.fc.weight.mul_(sharpen)
        model.fc.bias[EOS] += eos_bias
    return model


@pytest.mark.parametrize("arch", sorted(DECODERS))
@pytest.mark.parametrize("batch,beam_size,length_penalty", [(24, 3, 0.0), (13, 4, 0.7), (2, 3, 0.0), (1, 2, 0.5)])
def test_beam_search_equals_the_plain_batched_search_bit_for_bit(arch, batch, beam_size, length_penalty):
    """Per-image features kept once, back-pointers instead of a growing history: the same tokens, and the same
    scores and attention maps to float rounding, on random real-width models and a trained one.

    The two searches run the decoder on batches of different sizes (finished images leave the batch). On
    AVX512 CPUs the results were equal to the last bit; on AMX CPUs oneDNN's matmul kernels round by batch
    shape, and scores differed by up to 1e-6 (2.4e-7 relative, with the same tokens)."""
    torch.manual_seed(batch)
    feats = torch.randn(batch, 49, 320).abs()
    for model in (_random(arch, seed=batch), _random(arch, sharpen=1.0, eos_bias=0.0, seed=batch + 1)):
        ref_tokens, ref_scores, ref_alphas = _reference_beam_search(model, feats, beam_size, 14, length_penalty)
        out = beam_search(model, feats, beam_size, 14, length_penalty, return_alphas=True)
        assert out.tokens == ref_tokens
        assert out.scores == pytest.approx(ref_scores, rel=1e-6, abs=1e-6)
        if ref_alphas is None:
            assert out.alphas is None
        else:
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(out.alphas, ref_alphas))
    trained, tfeats = _trained(arch)
    ref = _reference_beam_search(trained, tfeats, beam_size, 12, length_penalty)
    out = beam_search(trained, tfeats, beam_size, 12, length_penalty)
    assert out.tokens == ref[0]
    assert out.scores == pytest.approx(ref[1], rel=1e-6, abs=1e-6)
    assert len({len(t) for t in out.tokens}) > 1  # hypotheses that end early next to ones still open


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_beam_search_equals_a_reference_search_one_image_at_a_time(arch):
    """The batched search against the plain search run on each image alone (three rows per step)."""
    torch.manual_seed(3)
    feats = torch.randn(10, 49, 320).abs()
    model = _random(arch, seed=3)
    out = beam_search(model, feats, 3, 14)
    single = [_reference_beam_search(model, feats[i: i + 1], 3, 14) for i in range(feats.shape[0])]
    assert out.tokens == [s[0][0] for s in single]
    assert out.scores == pytest.approx([s[1][0] for s in single], abs=1e-4)


def test_reorder_state_keeps_one_feature_grid_per_image():
    """Show-Attend-and-Tell's grids stay one per image under beam reordering and are re-selected, not copied
    per beam; without ``group`` the per-row layout of ``init_state`` is reordered as before."""
    model = _random("show_attend_tell")
    feats = torch.randn(4, 49, 320)
    with torch.inference_mode():
        state = model.reorder_state(model.init_state(feats), torch.arange(4).repeat_interleave(3), group=3)
        assert state[0].shape[0] == 12 and state[2].shape[0] == 4
        moved = model.reorder_state(state, torch.tensor([2, 0, 0, 3, 5, 4, 8, 8, 6, 9, 11, 10]), group=3)
        assert moved[2] is state[2] and moved[3] is state[3]
        swapped = model.reorder_state(state, torch.tensor([9, 10, 11, 0, 1, 2]), group=3)  # images 3 and 0
        assert torch.equal(swapped[2], state[2][[3, 0]])
        per_row = model.init_state(feats)
        plain = model.reorder_state(per_row, torch.tensor([3, 3, 1]))
        assert torch.equal(plain[2], per_row[2][[3, 3, 1]])
        # The grouped step gives the numbers of the per-row step.
        expanded = model.reorder_state(per_row, torch.arange(4).repeat_interleave(3))
        prev = torch.randint(4, 600, (12,))
        grouped_logits, _, grouped_alpha = model.step(state, prev)
        row_logits, _, row_alpha = model.step(expanded, prev)
        assert torch.equal(grouped_logits, row_logits) and torch.equal(grouped_alpha, row_alpha)


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_dropping_finished_images_is_the_same_search(arch):
    """``drop_finished``: images whose hypotheses have all ended leave the model's batch; the captions are those
    of the full search (scores to rounding), with attention maps, on a trained model whose captions end at
    different steps, and the chunked decoding passes it on."""
    model, feats = _trained(arch)
    feats = torch.cat([feats, torch.randn(8, P, DIM)])
    for beam_size, length_penalty in ((3, 0.0), (4, 0.7), (2, 0.5)):
        full = beam_search(model, feats, beam_size, 12, length_penalty, return_alphas=True)
        dropped = beam_search(model, feats, beam_size, 12, length_penalty, return_alphas=True, drop_finished=True)
        assert len({len(t) for t in full.tokens}) > 1
        assert dropped.tokens == full.tokens
        assert dropped.scores == pytest.approx(full.scores, abs=1e-5)
        if full.alphas is None:
            assert dropped.alphas is None
        else:
            for a, b in zip(dropped.alphas, full.alphas):
                torch.testing.assert_close(a, b)
    chunked = decode_batched(model, feats, batch_size=5, beam_size=3, max_len=12, drop_finished=True)
    assert chunked.tokens == decode_batched(model, feats, batch_size=5, beam_size=3, max_len=12).tokens
