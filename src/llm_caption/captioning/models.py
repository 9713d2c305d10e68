"""Caption decoders over a grid of image features, chosen by name from :data:`DECODERS`.

All decoders share one interface so that training and decoding never branch on the architecture:

* ``forward(feats, tokens_in) -> (logits, alphas)`` -- teacher forcing; ``feats`` is ``[B, P, C]``
  (P grid positions of C channels), ``tokens_in`` is ``[B, T]`` starting with ``<sos>``;
  ``logits`` is ``[B, T, V]`` (the prediction of the token after each input token),
  ``alphas`` is ``[B, T, P]`` for attention models and ``None`` otherwise.
* ``init_state(feats)`` / ``step(state, prev_tokens) -> (logits [B, V], state, alpha [B, P] | None)``
  / ``reorder_state(state, index, group=1)`` -- one decoding step at a time, for greedy and beam search.
  ``reorder_state`` makes row ``j`` of the new state a copy of row ``index[j]``; with ``group > 1`` the new
  rows come in blocks of ``group`` that each descend from one image (the beams of an image), and a decoder
  may then keep what depends on the image only (Show-Attend-and-Tell's feature grid and its attention
  projection) once per block instead of once per row.
* ``aux_loss(alphas, mask)`` -- the architecture's regulariser (doubly stochastic attention for
  Show-Attend-and-Tell, zero otherwise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ShowTell(nn.Module):
    """Show and Tell (Vinyals et al., 2015): the pooled image vector is the LSTM's first input."""

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 256, hidden_dim: int = 512,
                 dropout: float = 0.3, pad_id: int = 0, num_layers: int = 1) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.image_proj = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.Dropout(dropout))
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, feats: torch.Tensor, tokens_in: torch.Tensor) -> tuple[torch.Tensor, None]:
        image = self.image_proj(feats.mean(dim=1)).unsqueeze(1)
        inputs = torch.cat([image, self.dropout(self.embed(tokens_in))], dim=1)
        out, _ = self.lstm(inputs)
        return self.fc(self.dropout(out[:, 1:])), None

    def init_state(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, state = self.lstm(self.image_proj(feats.mean(dim=1)).unsqueeze(1))
        return state

    def step(self, state, prev_tokens: torch.Tensor):
        out, state = self.lstm(self.embed(prev_tokens).unsqueeze(1), state)
        return self.fc(out[:, 0]), state, None

    @staticmethod
    def reorder_state(state, index: torch.Tensor, group: int = 1):
        h, c = state
        return h.index_select(1, index), c.index_select(1, index)

    def aux_loss(self, alphas, mask) -> torch.Tensor:
        return torch.zeros(())


class AdditiveAttention(nn.Module):
    """Soft attention (Bahdanau): score each grid position against the decoder state."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.feat_att = nn.Linear(feature_dim, attention_dim)
        self.hidden_att = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, feats: torch.Tensor, feats_att: torch.Tensor, hidden: torch.Tensor):
        e = self.score(torch.tanh(feats_att + self.hidden_att(hidden).unsqueeze(1))).squeeze(2)  # [B, P]
        alpha = torch.softmax(e, dim=1)
        return (feats * alpha.unsqueeze(2)).sum(dim=1), alpha


class ShowAttendTell(nn.Module):
    """Show, Attend and Tell (Xu et al., 2015): soft attention over the grid with a gating scalar."""

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 256, hidden_dim: int = 512,
                 attention_dim: int = 256, dropout: float = 0.3, pad_id: int = 0,
                 alpha_c: float = 1.0, feature_proj: int | None = None) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.alpha_c = alpha_c
        # Optional linear projection of the grid features (1280 -> feature_proj) before attention: a smaller LSTM input.
        self.feature_proj = nn.Linear(feature_dim, feature_proj) if feature_proj else nn.Identity()
        feature_dim = feature_proj or feature_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.attention = AdditiveAttention(feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, feature_dim)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, feats: torch.Tensor):
        feats = self.feature_proj(feats)
        mean = feats.mean(dim=1)
        return (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), feats, self.attention.feat_att(feats))

    def _advance(self, state, emb: torch.Tensor):
        h, c, feats, feats_att = state
        context, alpha = self.attention(feats, feats_att, h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.cell(torch.cat([emb, context], dim=1), (h, c))
        return h, (h, c, feats, feats_att), alpha

    def forward(self, feats: torch.Tensor, tokens_in: torch.Tensor):
        state = self.init_state(feats)
        emb = self.dropout(self.embed(tokens_in))
        outs, alphas = [], []
        for t in range(tokens_in.shape[1]):
            h, state, alpha = self._advance(state, emb[:, t])
            outs.append(h)
            alphas.append(alpha)
        return self.fc(self.dropout(torch.stack(outs, dim=1))), torch.stack(alphas, dim=1)

    def step(self, state, prev_tokens: torch.Tensor):
        """One word for every row of ``state``. The feature grid (and its attention projection) either has one
        row per decoder row, as ``init_state`` makes it, or one row per block of rows (the beams of one image,
        see ``reorder_state``): the same numbers, without a copy of the grid for every beam."""
        h, c, feats, feats_att = state
        if feats.shape[0] == h.shape[0]:  # dropout as in forward (a no-op in eval mode; SCST's sample_dropout)
            h, state, alpha = self._advance(state, self.dropout(self.embed(prev_tokens)))
            return self.fc(self.dropout(h)), state, alpha
        rows, images = h.shape[0], feats.shape[0]
        group = rows // images
        att = self.attention
        # AdditiveAttention on [images, group, P, .] views: elementwise the same operations, in the same order.
        hidden = att.hidden_att(h).reshape(images, group, 1, -1)
        e = att.score(torch.tanh(feats_att.unsqueeze(1) + hidden)).squeeze(3)  # [images, group, P]
        alpha = torch.softmax(e, dim=2)
        context = (feats.unsqueeze(1) * alpha.unsqueeze(3)).sum(dim=2).reshape(rows, -1)
        alpha = alpha.reshape(rows, -1)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.cell(torch.cat([self.embed(prev_tokens), context], dim=1), (h, c))
        return self.fc(h), (h, c, feats, feats_att), alpha

    @staticmethod
    def reorder_state(state, index: torch.Tensor, group: int = 1):
        """Rows ``index`` of the hidden state. With ``group > 1`` the grid stays one row per image (a block of
        ``group`` new rows descends from one image); a grid that is already per image is only re-selected
        when the images change (a beam search dropping finished images), never copied per beam."""
        h, c, feats, feats_att = state
        shared = h.shape[0] // feats.shape[0]  # rows per grid row now
        if group == 1 and shared == 1:
            return tuple(s.index_select(0, index) for s in state)
        images = index[::group] // shared if group > 1 else index // shared
        same = images.shape[0] == feats.shape[0] and torch.equal(images, torch.arange(feats.shape[0],
                                                                              device=images.device))
        if not same:
            feats, feats_att = feats.index_select(0, images), feats_att.index_select(0, images)
        return h.index_select(0, index), c.index_select(0, index), feats, feats_att

    def aux_loss(self, alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Doubly stochastic regularisation: each position's attention summed over the words is pushed to 1."""
        total = (alphas * mask.unsqueeze(2).to(alphas.dtype)).sum(dim=1)  # [B, P]
        return self.alpha_c * ((1.0 - total) ** 2).mean()


class CNNTransformer(nn.Module):
    """A Transformer decoder whose memory is the projected feature grid (with learned position embeddings)."""

    def __init__(self, vocab_size: int, feature_dim: int, d_model: int = 256, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 1024, dropout: float = 0.1, pad_id: int = 0,
                 max_len: int = 64, max_positions: int = 256) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.d_model = d_model
        self.mem_proj = nn.Sequential(nn.Linear(feature_dim, d_model), nn.LayerNorm(d_model))
        self.mem_pos = nn.Parameter(torch.zeros(max_positions, d_model))
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.mem_pos, std=0.02)

    def encode_memory(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mem_proj(feats) + self.mem_pos[: feats.shape[1]]

    def decode(self, memory: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
        length = tokens_in.shape[1]
        positions = torch.arange(length, device=tokens_in.device)
        x = self.embed(tokens_in) * math.sqrt(self.d_model) + self.pos(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens_in.device).triu(1)  # True = hidden
        padding = tokens_in == self.pad_id
        out = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=padding, tgt_is_causal=True)
        return self.fc(self.norm(out))

    def forward(self, feats: torch.Tensor, tokens_in: torch.Tensor):
        return self.decode(self.encode_memory(feats), tokens_in), None

    def init_state(self, feats: torch.Tensor):
        """``(memory, tokens so far, one self-attention cache per layer)``: a layer's cache holds its
        normalised inputs at the positions decoded so far, from which its self-attention takes keys and values."""
        memory = self.encode_memory(feats)
        batch = feats.shape[0]
        empty = memory.new_zeros(batch, 0, self.d_model)
        return (memory, torch.zeros(batch, 0, dtype=torch.long, device=feats.device),
                *(empty for _ in self.decoder.layers))

    def step(self, state, prev_tokens: torch.Tensor):
        """One token per row, incrementally: each layer attends from the new position to its cached earlier
        positions, so a step costs the same at every length (the full-prefix :meth:`decode` of every step
        grows with the caption). The logits equal ``decode(memory, tokens)[:, -1]`` to float rounding
        (tested); a ``<pad>`` fed after a row's ``<eos>`` is not masked, which changes only rows already done."""
        memory, tokens, *caches = state
        position = tokens.shape[1]
        tokens = torch.cat([tokens, prev_tokens.unsqueeze(1)], dim=1)
        x = self.embed(prev_tokens).unsqueeze(1) * math.sqrt(self.d_model) + self.pos.weight[position]
        new_caches = []
        for layer, cache in zip(self.decoder.layers, caches):
            h = layer.norm1(x)
            keys = torch.cat([cache.to(h.dtype), h], dim=1)
            x = x + layer.dropout1(layer.self_attn(h, keys, keys, need_weights=False)[0])
            x = x + layer.dropout2(layer.multihead_attn(layer.norm2(x), memory, memory, need_weights=False)[0])
            x = x + layer._ff_block(layer.norm3(x))
            new_caches.append(keys)
        return self.fc(self.norm(x))[:, 0], (memory, tokens, *new_caches), None

    @staticmethod
    def reorder_state(state, index: torch.Tensor, group: int = 1):
        return tuple(s.index_select(0, index) for s in state)

    def aux_loss(self, alphas, mask) -> torch.Tensor:
        return torch.zeros(())


DECODERS: dict[str, type[nn.Module]] = {
    "show_tell": ShowTell,
    "show_attend_tell": ShowAttendTell,
    "cnn_transformer": CNNTransformer,
}


def build_decoder(architecture: str, vocab_size: int, feature_dim: int, pad_id: int = 0,
                  **kwargs: Any) -> nn.Module:
    """Instantiate the decoder registered as ``architecture`` with its keyword arguments from config."""
    if architecture not in DECODERS:
        raise ValueError(f"unknown architecture '{architecture}'; known: {sorted(DECODERS)}")
    return DECODERS[architecture](vocab_size=vocab_size, feature_dim=feature_dim, pad_id=pad_id, **kwargs)


def caption_loss(model: nn.Module, feats: torch.Tensor, tokens: torch.Tensor,
                 label_smoothing: float = 0.0, image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced cross-entropy of ``tokens`` (``<sos> ... <eos> <pad>...``) ignoring ``<pad>``, plus the regulariser.

    ``image_index`` (for a model whose rows of ``feats`` are images, :class:`.encoder_top.TopCaptioner`): caption
    ``i`` belongs to row ``image_index[i]``."""
    tokens_in, targets = tokens[:, :-1], tokens[:, 1:]
    logits, alphas = model(feats, tokens_in) if image_index is None else model(feats, tokens_in, image_index)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=model.pad_id, label_smoothing=label_smoothing)
    if alphas is not None:
        loss = loss + model.aux_loss(alphas, targets != model.pad_id)
    return loss
