"""Beam search alone, at Flickr8k-like sizes: ``python -m benchmarks.beam [--images 128] [--vocab 2800] ...``

The project's batched ``decoding.beam_search`` against the tutorial's per-image ``caption_image_beam_search``
(:mod:`benchmarks.caption`) on the same Show-Attend-and-Tell decoder (configured sizes of
``parameters_caption_training.yml`` unless ``--hidden`` etc. say otherwise) and the same feature grids
(``[images, 49, 1280]``, EfficientNet-lite0's 7x7 grid). By default the decoder is untrained (seeded) on random
grids: every hypothesis runs to ``--max-len``, the worst case for a batched search, which cannot stop early per
image. ``--trained`` instead takes ``make bench``'s set-up: real photos (Flickr8k when present), their grids
from the packaged encoder, a decoder trained for ``--epochs`` epochs on ``--train-images`` images' captions, and
the tutorial's 50-step limit. Both sides alternate, in one process, at the same thread count; their captions
must be identical.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .caption import _params, _strip, caption_image_beam_search
from .common import Series, alternate


def trained(images: int, train_images: int = 64, epochs: int = 15, seed: int = 42):
    """(decoder, grids ``[images, P, C]``, vocabulary size) as ``benchmarks.caption.run`` makes them for its
    beam search: a Show-Attend-and-Tell decoder trained on cached grids of ``train_images`` photos."""
    from llm_caption.captioning.encoder import build_encoder
    from llm_caption.captioning.features import extract_features
    from llm_caption.captioning.models import build_decoder, caption_loss
    from llm_caption.captioning.transforms import build_transform, make_transform_spec

    from .caption import _vocab_and_tokens, image_captions

    params = _params()
    cfg = params["caption"]
    decoder_cfg = dict(cfg["decoders"]["show_attend_tell"])
    training = {**cfg["training"], **(decoder_cfg.pop("training", None) or {})}
    paths, captions, _ = image_captions(train_images + images, seed)
    vocab, rows, tokens = _vocab_and_tokens(captions[:train_images], int(params["data"].get("max_len", 20)))
    transform = build_transform(make_transform_spec(params["data"].get("image_transform")), train=False)
    encoder, _ = build_encoder(cfg["encoder"])
    encoder.eval()
    grids = torch.from_numpy(extract_features(encoder, [str(p) for p in paths], transform, batch_size=32,
                                              desc="grids")[0])[:, 0].float()
    torch.manual_seed(seed)
    model = build_decoder("show_attend_tell", len(vocab), grids.shape[-1], pad_id=vocab.pad_id, **decoder_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(training["lr"]),
                                  weight_decay=float(training["weight_decay"]))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for lo in range(0, len(order), 64):
            idx = order[lo: lo + 64]
            batch_tokens = tokens[idx]
            length = int((batch_tokens != vocab.pad_id).sum(dim=1).max())
            loss = caption_loss(model, grids[:train_images][rows[idx]], batch_tokens[:, :length],
                                float(training["label_smoothing"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(training["grad_clip"]))
            optimizer.step()
    return model.eval(), grids[train_images:], len(vocab)


def run(images: int = 128, vocab: int = 2800, beam_size: int = 3, max_len: int = 22, reps: int = 3,
        seed: int = 0, train: dict | None = None, drop_finished: bool = False, **decoder_overrides) -> dict:
    from llm_caption.captioning.decoding import EOS, SOS, beam_search
    from llm_caption.captioning.models import build_decoder

    cfg = dict(_params()["caption"]["decoders"]["show_attend_tell"])
    cfg.pop("training", None)
    cfg.update({k: v for k, v in decoder_overrides.items() if v is not None}, dropout=0.0)
    if train is None:
        torch.manual_seed(seed)
        model = build_decoder("show_attend_tell", vocab, 1280, **cfg).eval()
        feats = torch.randn(images, 49, 1280).abs()
    else:
        model, feats, vocab = trained(images, **train)
        images = feats.shape[0]
    word_map = {"<sos>": SOS, "<eos>": EOS, **{f"w{i}": i for i in range(4, vocab)}}
    word_map.update({"<pad>": 0, "<unk>": 3})

    def project(rep: int):
        start = time.perf_counter()
        out = beam_search(model, feats, beam_size=beam_size, max_len=max_len,
                          **({"drop_finished": True} if drop_finished else {}))
        return time.perf_counter() - start, out.tokens

    @torch.no_grad()
    def peer(rep: int):
        start = time.perf_counter()
        out = [_strip(caption_image_beam_search(model, feats[i: i + 1], word_map, beam_size, max_len - 1), SOS, EOS)
               for i in range(images)]
        return time.perf_counter() - start, out

    raw = alternate({"project": project, "peer": peer}, reps)
    same = sum(a == b for a, b in zip(raw["project"][0][1], raw["peer"][0][1]))
    sides = {name: Series([images / s for s, _ in results]) for name, results in raw.items()}
    project_tokens = raw["project"][0][1]
    return {"settings": {"images": images, "vocab": vocab, "beam_size": beam_size, "max_len": max_len, "reps": reps,
                         "threads": torch.get_num_threads(), "decoder": cfg, "trained": train,
                         "drop_finished": drop_finished},
            "caption_lengths": sorted(len(t) for t in project_tokens),
            "captions_per_s": {name: series.values for name, series in sides.items()},
            "project": sides["project"].text("{:.1f}"), "peer": sides["peer"].text("{:.1f}"),
            "ratio": sides["project"].median / sides["peer"].median, "identical": f"{same}/{images}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.beam", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2800)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=22)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=None, help="decoder hidden_dim (default: configured)")
    parser.add_argument("--embed", type=int, default=None, help="decoder embed_dim (default: configured)")
    parser.add_argument("--attention", type=int, default=None, help="attention_dim (default: configured)")
    parser.add_argument("--feature-proj", type=int, default=None,
                        help="feature_proj (default: configured; 0 = the raw 1280-channel grid)")
    parser.add_argument("--trained", action="store_true",
                        help="make bench's trained decoder on real photos (max len 51 unless --max-len says)")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--drop-finished", action="store_true",
                        help="beam_search(drop_finished=True): images whose hypotheses all ended leave the batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = dict(train_images=args.train_images, epochs=args.epochs) if args.trained else None
    max_len = 51 if args.trained and args.max_len == 22 else args.max_len
    out = run(args.images, args.vocab, args.beam, max_len, args.reps, train=train, drop_finished=args.drop_finished,
              hidden_dim=args.hidden,
              embed_dim=args.embed, attention_dim=args.attention,
              feature_proj=None if args.feature_proj is None else (args.feature_proj or False))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
