"""Captioner training (cached feature grids vs re-encoding every step) and beam search (batched vs per image).

Data: real photos with their captions, Flickr8k (``../shared/data/flickr8k``, Kaggle layout) when it is there,
else the project's synthetic scenes written to a temporary folder. The encoder is the frozen, packaged
EfficientNet-lite0 of ``parameters_caption_training.yml``; the decoder is Show-Attend-and-Tell with its
configured sizes (the architecture of the published PyTorch tutorial).

Training: both sides run the same loop (same decoder initialisation, caption order, batches, AdamW, clipping,
``models.caption_loss``). The only difference is where a batch's feature grids come from:

* project: rows of the fp16 feature cache (``features.extract_features``, built once; its time is reported
  apart);
* peer (the tutorial's loop): the batch's images, already decoded and resized (the tutorial reads them from an
  HDF5 file), go through the frozen encoder in every step.

Beam search, from the same feature grids on both sides (the encoder pass is the same work for both and is
left out): the project's batched ``decoding.beam_search`` over all images at once vs the tutorial's
``caption_image_beam_search``, written out below, one image at a time. Both must produce the same tokens.
"""

from __future__ import annotations

import csv
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import Series, alternate, count_flops

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def _params() -> dict[str, Any]:
    import yaml

    conf = ROOT / "conf" / "base"
    caption = yaml.safe_load((conf / "parameters_caption_training.yml").read_text(encoding="utf-8"))
    data = yaml.safe_load((conf / "parameters_data_engineering_captions.yml").read_text(encoding="utf-8")) \
        if (conf / "parameters_data_engineering_captions.yml").is_file() else {}
    return {"caption": caption["caption_training"], "data": (data or {}).get("caption_data") or {}}


def image_captions(n_images: int, seed: int, source: Path | None = None) -> tuple[list[Path], list[list[str]], str]:
    """``n_images`` images (seeded draw from the train split) with their captions, and the data set's name."""
    root = source or FLICKR8K
    name = root.name
    if not (root / "captions.txt").is_file():
        from llm_caption.captioning.synthetic import SceneConfig, generate_scenes

        root = Path(tempfile.mkdtemp(prefix="llm_caption_bench_scenes_"))
        generate_scenes(root, SceneConfig(n_images=max(n_images, 8), image_size=224, seed=seed))
        name = "synthetic scenes"
    captions: dict[str, list[str]] = {}
    with open(root / "captions.txt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            captions.setdefault(row["image"], []).append(row["caption"])
    split = root / "splits" / "train.txt"
    names = split.read_text(encoding="utf-8").split() if split.is_file() else sorted(captions)
    names = sorted(n for n in names if n in captions and (root / "images" / n).is_file())
    chosen = random.Random(seed).sample(names, min(n_images, len(names)))
    return [root / "images" / n for n in chosen], [captions[n] for n in chosen], name


def _vocab_and_tokens(captions: list[list[str]], max_len: int):
    from llm_caption.captioning.text import clean_caption
    from llm_caption.captioning.vocab import Vocabulary

    cleaned = [[clean_caption(c) for c in caps] for caps in captions]
    vocab = Vocabulary.build([c for caps in cleaned for c in caps], min_count=1, max_len=max_len)
    rows, tokens = [], []
    for image_row, caps in enumerate(cleaned):
        for caption in caps:
            rows.append(image_row)
            tokens.append(vocab.encode(caption, max_len))
    return vocab, torch.tensor(rows), torch.tensor(tokens)


def caption_image_beam_search(decoder, encoder_out: torch.Tensor, word_map: dict[str, int], beam_size: int = 3,
                              max_steps: int = 50):
    """The tutorial's ``caption_image_beam_search`` (sgrvinod, a-PyTorch-Tutorial-to-Image-Captioning, caption.py)
    for one image, from its encoder output ``[1, P, C]`` on: the beam shrinks as hypotheses complete, the best
    complete sequence by summed log-probability wins. Mapped onto the project's ``ShowAttendTell`` modules
    (``embed``, ``attention``, ``f_beta``, ``cell``, ``fc``); the attention recomputes its projection of the
    encoder output every step, as the tutorial's ``Attention.forward`` does."""
    k = beam_size
    vocab_size = len(word_map)
    encoder_out = decoder.feature_proj(encoder_out)
    encoder_dim = encoder_out.size(-1)
    num_pixels = encoder_out.size(1)
    encoder_out = encoder_out.expand(k, num_pixels, encoder_dim)
    k_prev_words = torch.LongTensor([[word_map["<sos>"]]] * k)
    seqs = k_prev_words
    top_k_scores = torch.zeros(k, 1)
    complete_seqs, complete_seqs_scores = [], []
    step = 1
    mean_encoder_out = encoder_out.mean(dim=1)
    h, c = torch.tanh(decoder.init_h(mean_encoder_out)), torch.tanh(decoder.init_c(mean_encoder_out))
    while True:
        embeddings = decoder.embed(k_prev_words).squeeze(1)
        awe, alpha = decoder.attention(encoder_out, decoder.attention.feat_att(encoder_out), h)
        gate = torch.sigmoid(decoder.f_beta(h))
        awe = gate * awe
        h, c = decoder.cell(torch.cat([embeddings, awe], dim=1), (h, c))
        scores = decoder.fc(h)
        scores = F.log_softmax(scores, dim=1)
        scores = top_k_scores.expand_as(scores) + scores
        if step == 1:
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
        prev_word_inds = top_k_words // vocab_size
        next_word_inds = top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
        incomplete_inds = [ind for ind, next_word in enumerate(next_word_inds) if next_word != word_map["<eos>"]]
        complete_inds = list(set(range(len(next_word_inds))) - set(incomplete_inds))
        if len(complete_inds) > 0:
            complete_seqs.extend(seqs[complete_inds].tolist())
            complete_seqs_scores.extend(top_k_scores[complete_inds])
        k -= len(complete_inds)
        if k == 0:
            break
        seqs = seqs[incomplete_inds]
        h = h[prev_word_inds[incomplete_inds]]
        c = c[prev_word_inds[incomplete_inds]]
        encoder_out = encoder_out[prev_word_inds[incomplete_inds]]
        top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete_inds].unsqueeze(1)
        if step > max_steps:
            break
        step += 1
    if not complete_seqs_scores:  # the tutorial would fail here (max of nothing): keep the best open sequence
        complete_seqs, complete_seqs_scores = seqs.tolist(), list(top_k_scores.view(-1))
    i = complete_seqs_scores.index(max(complete_seqs_scores))
    return complete_seqs[i]


def _strip(seq: list[int], sos: int, eos: int) -> list[int]:
    seq = [t for t in seq if t != sos]
    return seq[: seq.index(eos)] if eos in seq else seq


def run(n_images: int = 96, n_beam_images: int = 48, epochs: int = 1, reps: int = 2, batch: int = 64,
        extra_epochs: int = 12, beam_size: int = 3, source: Path | None = None) -> dict[str, Any]:
    """Training images/s of both sides (alternating epochs), then beam-search captions/s of both sides."""
    from llm_caption.captioning.decoding import beam_search
    from llm_caption.captioning.encoder import build_encoder
    from llm_caption.captioning.features import extract_features, load_image
    from llm_caption.captioning.models import build_decoder, caption_loss
    from llm_caption.captioning.transforms import build_transform, make_transform_spec

    params = _params()
    cfg = params["caption"]
    seed = 42
    decoder_cfg = dict(cfg["decoders"]["show_attend_tell"])
    training = {**cfg["training"], **(decoder_cfg.pop("training", None) or {})}  # per-architecture overrides
    max_len = int(params["data"].get("max_len", 20))
    paths, captions, data_name = image_captions(n_images + n_beam_images, seed, source)
    train_paths, beam_paths = paths[:n_images], paths[n_images:]
    vocab, rows, tokens = _vocab_and_tokens(captions[:n_images], max_len)
    transform = build_transform(make_transform_spec(params["data"].get("image_transform")), train=False)
    encoder, _ = build_encoder(cfg["encoder"])
    encoder.eval()

    start = time.perf_counter()
    cached, _, _ = extract_features(encoder, [str(p) for p in train_paths], transform, batch_size=32,
                                    desc="feature cache")
    cache_s = time.perf_counter() - start
    features = torch.from_numpy(cached)  # [N, 1, P, C] fp16, as the project's cache holds them
    pixels = torch.stack([transform(load_image(p)) for p in train_paths])  # the tutorial's pre-resized images
    feature_dim = features.shape[-1]

    def new_decoder():
        torch.manual_seed(seed)
        return build_decoder("show_attend_tell", len(vocab), feature_dim, pad_id=vocab.pad_id,
                             **decoder_cfg)

    def grids_project(idx: torch.Tensor) -> torch.Tensor:
        return features[rows[idx], 0].float()

    @torch.no_grad()
    def grids_peer(idx: torch.Tensor) -> torch.Tensor:
        return encoder(pixels[rows[idx]]).flatten(2).transpose(1, 2)

    def train_epochs(model, optimizer, grids, n_epochs: int, first_epoch: int = 0) -> tuple[float, float]:
        """(seconds, last batch loss) of ``n_epochs`` epochs over every caption."""
        model.train()
        loss = torch.zeros(())
        start = time.perf_counter()
        for epoch in range(first_epoch, first_epoch + n_epochs):
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for lo in range(0, len(order), batch):
                idx = order[lo: lo + batch]
                batch_tokens = tokens[idx]
                length = int((batch_tokens != vocab.pad_id).sum(dim=1).max())
                loss = caption_loss(model, grids(idx), batch_tokens[:, :length], float(training["label_smoothing"]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(training["grad_clip"]))
                optimizer.step()
        return time.perf_counter() - start, float(loss)

    def side(grids):
        def one(rep: int) -> dict[str, float]:
            model = new_decoder()
            optimizer = torch.optim.AdamW(model.parameters(), lr=float(training["lr"]),
                                          weight_decay=float(training["weight_decay"]))
            seconds, loss = train_epochs(model, optimizer, grids, epochs)
            return {"images_per_s": len(rows) * epochs / seconds, "s_per_epoch": seconds / epochs, "loss": loss}
        return one

    raw = alternate({"project": side(grids_project), "peer": side(grids_peer)}, reps)
    train_out = {name: {key: Series([r[key] for r in results]) for key in results[0]} for name, results in raw.items()}

    # FLOPs per training image: one step of each side on the first batch, counted by torch's flop counter.
    idx = torch.arange(min(batch, len(rows)))

    def flops_of(grids) -> float:
        model = new_decoder()
        model.train()

        def step() -> None:
            caption_loss(model, grids(idx), tokens[idx], 0.0).backward()
        return count_flops(step) / len(idx)

    flops = {"project": flops_of(grids_project), "peer": flops_of(grids_peer)}

    # Beam search with a decoder trained on the cached features (a few more epochs, so that it ends its captions).
    model = new_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(training["lr"]),
                                  weight_decay=float(training["weight_decay"]))
    train_epochs(model, optimizer, grids_project, extra_epochs)
    model.eval()
    beam_feats = torch.from_numpy(extract_features(encoder, [str(p) for p in beam_paths], transform,
                                                   batch_size=32, desc="beam images")[0])[:, 0].float()
    word_map = vocab.stoi
    max_steps = 50  # the tutorial's limit: steps 1..51

    def beam_project(rep: int):
        start = time.perf_counter()
        out = beam_search(model, beam_feats, beam_size=beam_size, max_len=max_steps + 1, length_penalty=0.0,
                          drop_finished=True)  # as the pipeline and the served model decode (decoding.drop_finished)
        return time.perf_counter() - start, out.tokens

    @torch.no_grad()
    def beam_peer(rep: int):
        start = time.perf_counter()
        out = [_strip(caption_image_beam_search(model, beam_feats[i: i + 1], word_map, beam_size, max_steps),
                      vocab.sos_id, vocab.eos_id) for i in range(beam_feats.shape[0])]
        return time.perf_counter() - start, out

    beams = alternate({"project": beam_project, "peer": beam_peer}, reps)
    project_tokens, peer_tokens = beams["project"][0][1], beams["peer"][0][1]
    mismatches = [i for i, (a, b) in enumerate(zip(project_tokens, peer_tokens)) if a != b]
    beam_out = {name: {"captions_per_s": Series([len(beam_paths) / s for s, _ in results])}
                for name, results in beams.items()}
    samples = [" ".join(vocab.itos[t] for t in project_tokens[i]) for i in range(min(3, len(project_tokens)))]
    return {"settings": {"data": data_name, "train_images": len(train_paths), "train_captions": len(rows),
                         "beam_images": len(beam_paths), "batch": batch, "epochs": epochs, "reps": reps,
                         "beam_size": beam_size, "vocab": len(vocab), "threads": torch.get_num_threads(),
                         "cache_build_s": cache_s, "cache_images_per_s": len(train_paths) / cache_s},
            "train": train_out, "flops_per_image": flops, "beam": beam_out,
            "beam_mismatches": mismatches, "beam_samples": samples}
