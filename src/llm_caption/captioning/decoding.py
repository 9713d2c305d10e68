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
                length_penalty: float = 0.0, return_alphas: bool = False, drop_finished: bool = False) -> Decoded:
    """Batched beam search: ``beam_size`` hypotheses for each of the ``B`` images in ``feats`` ``[B, P, C]``.

    The beams of image ``b`` are rows ``b * K .. b * K + K - 1`` throughout. What depends on the image alone is
    computed once per image (``init_state`` on ``B`` rows, expanded with ``reorder_state(..., group=K)``, which
    lets Show-Attend-and-Tell keep one feature grid per image instead of copying it to every beam every step);
    the numbers are those of ``init_state`` on every beam's row, bit for bit (checked in the tests).
    Tokens (and attention maps) are read back at the end from each step's back-pointers.

    By default every row goes through the model every step, finished or not, until the last hypothesis of
    the batch ends. ``drop_finished=True`` leaves out of the model's batch every image all of whose hypotheses
    have ended (their rows would only be overwritten: a finished hypothesis carries its score on ``<eos>``;
    the selection still runs over every row). That is the same search, but the matrix products change shape
    as images leave, and CPU BLAS kernels (a matrix-vector product above all) then round differently in the
    last bits: scores and attention maps agree to ~1e-6 rather than bit for bit, and a caption can differ
    where two hypotheses tie to that precision -- as captions of the default search already can from one
    batch size to another.
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
    active = torch.arange(batch)  # images whose rows the model's state holds, in order (drop_finished)
    active_rows: torch.Tensor | None = None  # their flat rows; None: every row
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (origin, token, alpha) per step
    for _ in range(max_len):
        logits, state, alpha = model.step(state, prev if active_rows is None else prev[active_rows])
        if active_rows is None:
            logp = torch.log_softmax(logits.float(), dim=-1)
        else:  # the rows left out are all finished: -inf, and 0 on <eos>, below
            logp = torch.full((flat, logits.shape[-1]), float("-inf"))
            logp[active_rows] = torch.log_softmax(logits.float(), dim=-1)
            if alpha is not None and return_alphas:
                alpha = alpha.new_zeros(flat, alpha.shape[-1]).index_copy_(0, active_rows, alpha)
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
        if not drop_finished:
            state = model.reorder_state(state, origin, group=k)
            continue
        keep = (~finished.reshape(batch, k).all(dim=1))[active].nonzero().squeeze(1)  # positions in `active`
        active = active[keep]
        rows = (active * k).unsqueeze(1) + torch.arange(k)  # [A, K] flat rows of the images kept
        index = (keep * k).unsqueeze(1) + origin[rows] - (active * k).unsqueeze(1)  # their rows in the state
        state = model.reorder_state(state, index.reshape(-1), group=k)
        active_rows = None if active.shape[0] == batch else rows.reshape(-1)
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
                   max_len: int = 30, length_penalty: float = 0.0, return_alphas: bool = False,
                   drop_finished: bool = False) -> Decoded:
    """Decode many images in chunks of ``batch_size`` (fp16 cache rows are cast to float per chunk);
    ``drop_finished``: see :func:`beam_search`."""
    tokens: list[list[int]] = []
    alphas: list[torch.Tensor] = []
    for start in range(0, feats.shape[0], batch_size):
        chunk = feats[start: start + batch_size].float()
        if beam_size == 1:
            res = greedy_decode(model, chunk, max_len, return_alphas)
        else:
            res = beam_search(model, chunk, beam_size, max_len, length_penalty, return_alphas, drop_finished)
        tokens.extend(res.tokens)
        if res.alphas:
            alphas.extend(res.alphas)
    return Decoded(tokens, alphas or None)
