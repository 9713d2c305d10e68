"""Greedy decoding and batched beam search over any decoder of :mod:`llm_caption.captioning.models`.

Both work on a whole batch of images at once. Beam search keeps ``beam_size`` hypotheses per
image in one flat batch of ``B * K`` rows; a finished hypothesis (it emitted ``<eos>``) keeps its
score. The final choice divides each score by ``length ** length_penalty`` (0 = no
normalisation). With ``beam_size=1`` beam search reduces to greedy decoding exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

SPECIAL_TOKENS = ("<pad>", "<sos>", "<eos>", "<unk>")
PAD, SOS, EOS, UNK = 0, 1, 2, 3


@dataclass
class Decoded:
    """Decoded token ids per image (without ``<sos>``, up to and excluding ``<eos>``) and, for attention
    models when asked, the attention weights ``[n_tokens, P]`` of every generated token."""

    tokens: list[list[int]]
    alphas: list[torch.Tensor] | None = None  # one [n_words, P] tensor per image
    scores: list[float] | None = None


def ids_to_words(ids: Sequence[int], itos: Sequence[str]) -> list[str]:
    """Token ids -> words, stopping at ``<eos>`` and dropping the special tokens."""
    words = []
    for i in ids:
        if i == EOS:
            break
        if i in (PAD, SOS):
            continue
        words.append(itos[i])
    return words


def _cut(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


@torch.inference_mode()
def greedy_decode(model: nn.Module, feats: torch.Tensor, max_len: int = 30,
                  return_alphas: bool = False) -> Decoded:
    """Pick the most probable token at every step, for every image of ``feats`` ``[B, P, C]``."""
    model.eval()
    batch = feats.shape[0]
    state = model.init_state(feats)
    prev = torch.full((batch,), SOS, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    out, alphas = [], []
    for _ in range(max_len):
        logits, state, alpha = model.step(state, prev)
        prev = logits.argmax(dim=-1)
        out.append(prev)
        if alpha is not None:
            alphas.append(alpha)
        done |= prev == EOS
        if bool(done.all()):
            break
    ids = torch.stack(out, dim=1).tolist()
    tokens = [_cut(row) for row in ids]
    result = Decoded(tokens)
    if return_alphas and alphas:
        stacked = torch.stack(alphas, dim=1)
        result.alphas = [stacked[i, : len(t)] for i, t in enumerate(tokens)]
    return result


@torch.inference_mode()
def beam_search(model: nn.Module, feats: torch.Tensor, beam_size: int = 3, max_len: int = 30,
                length_penalty: float = 0.0, return_alphas: bool = False) -> Decoded:
    """Batched beam search: ``beam_size`` hypotheses for each of the ``B`` images in ``feats`` ``[B, P, C]``.

    The beams of image ``b`` are rows ``b * K .. b * K + K - 1`` throughout. What depends on the image alone is
    computed once per image (``init_state`` on ``B`` rows, expanded with ``reorder_state(..., group=K)``, which
    lets Show-Attend-and-Tell keep one feature grid per image instead of copying it to every beam every step);
    the numbers are those of ``init_state`` on every beam's row, bit for bit (checked in the tests).
    Tokens (and attention maps) are read back at the end from each step's back-pointers.

    Every row goes through the model every step, finished or not: dropping finished images from the batch
    would change the shape of the matrix products, and CPU BLAS kernels (a matrix-vector product above all)
    then round differently, so captions could differ from one batch size to another in near-ties.
    """
    model.eval()
    batch, k = feats.shape[0], beam_size
    flat = batch * k
    if batch >= 4:  # the image's state once, then one copy of its rows per beam
        state = model.reorder_state(model.init_state(feats), torch.arange(batch).repeat_interleave(k), group=k)
    else:  # BLAS rounds products of 1-3 rows differently: the same rows as one row per beam would give
        state = model.reorder_state(model.init_state(feats.repeat_interleave(k, dim=0)), torch.arange(flat), group=k)
    scores = torch.full((batch, k), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one
    prev = torch.full((flat,), SOS, dtype=torch.long)
    finished = torch.zeros(flat, dtype=torch.bool)
    lengths = torch.zeros(flat)
    offsets = (torch.arange(batch) * k).unsqueeze(1)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (origin, token, alpha) per step
    for _ in range(max_len):
        logits, state, alpha = model.step(state, prev)
        logp = torch.log_softmax(logits.float(), dim=-1)
        vocab = logp.shape[-1]
        if bool(finished.any()):
            logp[finished] = float("-inf")
            logp[finished, EOS] = 0.0  # a finished hypothesis carries its score unchanged
        cand = (scores.reshape(flat, 1) + logp).reshape(batch, k * vocab)
        scores, idx = cand.topk(k, dim=1)
        origin = (offsets + idx // vocab).reshape(-1)
        prev = (idx % vocab).reshape(-1)
        steps.append((origin, prev, alpha if return_alphas else None))
        finished, lengths = finished[origin], lengths[origin]
        lengths = lengths + (~finished).float()
        finished = finished | (prev == EOS)
        if bool(finished.all()):
            break
        state = model.reorder_state(state, origin, group=k)
    normed = scores / lengths.reshape(batch, k).clamp(min=1.0) ** length_penalty if length_penalty else scores
    best = (offsets.squeeze(1) + normed.argmax(dim=1))
    rows, token_cols, alpha_cols = best, [], []
    for origin, token, step_alpha in reversed(steps):  # follow the back-pointers of the chosen hypotheses
        token_cols.append(token[rows])
        if step_alpha is not None:
            alpha_cols.append(step_alpha[origin[rows]])
        rows = origin[rows]
    ids = torch.stack(token_cols[::-1], dim=1).tolist() if token_cols else [[] for _ in range(batch)]
    tokens = [_cut(row) for row in ids]
    result = Decoded(tokens, scores=normed.max(dim=1).values.tolist())
    if return_alphas and alpha_cols:
        chosen = torch.stack(alpha_cols[::-1], dim=1)
        result.alphas = [chosen[i, : len(t)] for i, t in enumerate(tokens)]
    return result


def decode_batched(model: nn.Module, feats: torch.Tensor, batch_size: int = 64, beam_size: int = 1,
                   max_len: int = 30, length_penalty: float = 0.0, return_alphas: bool = False) -> Decoded:
    """Decode many images in chunks of ``batch_size`` (fp16 cache rows are cast to float per chunk)."""
    tokens: list[list[int]] = []
    alphas: list[torch.Tensor] = []
    for start in range(0, feats.shape[0], batch_size):
        chunk = feats[start: start + batch_size].float()
        if beam_size == 1:
            res = greedy_decode(model, chunk, max_len, return_alphas)
        else:
            res = beam_search(model, chunk, beam_size, max_len, length_penalty, return_alphas)
        tokens.extend(res.tokens)
        if res.alphas:
            alphas.extend(res.alphas)
    return Decoded(tokens, alphas or None)
