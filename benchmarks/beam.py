"""Beam search alone, at Flickr8k-like sizes: ``python -m benchmarks.beam [--images 128] [--vocab 2800] ...``

The project's batched ``decoding.beam_search`` against the tutorial's per-image ``caption_image_beam_search``
(:mod:`benchmarks.caption`) on the same Show-Attend-and-Tell decoder (configured sizes of
``parameters_caption_training.yml`` unless ``--hidden`` etc. say otherwise) and the same feature grids
(``[images, 49, 1280]``, EfficientNet-lite0's 7x7 grid). The decoder is untrained (seeded): every hypothesis
runs to ``--max-len``, the worst case for a batched search, which cannot stop early per image. Both sides
alternate, in one process, at the same thread count; their captions must be identical.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .caption import _params, _strip, caption_image_beam_search
from .common import Series, alternate


def run(images: int = 128, vocab: int = 2800, beam_size: int = 3, max_len: int = 22, reps: int = 3,
        seed: int = 0, **decoder_overrides) -> dict:
    from llm_caption.captioning.decoding import EOS, SOS, beam_search
    from llm_caption.captioning.models import build_decoder

    cfg = dict(_params()["caption"]["decoders"]["show_attend_tell"])
    cfg.pop("training", None)
    cfg.update({k: v for k, v in decoder_overrides.items() if v is not None}, dropout=0.0)
    torch.manual_seed(seed)
    model = build_decoder("show_attend_tell", vocab, 1280, **cfg).eval()
    feats = torch.randn(images, 49, 1280).abs()
    word_map = {"<sos>": SOS, "<eos>": EOS, **{f"w{i}": i for i in range(4, vocab)}}
    word_map.update({"<pad>": 0, "<unk>": 3})

    def project(rep: int):
        start = time.perf_counter()
        out = beam_search(model, feats, beam_size=beam_size, max_len=max_len)
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
    return {"settings": {"images": images, "vocab": vocab, "beam_size": beam_size, "max_len": max_len, "reps": reps,
                         "threads": torch.get_num_threads(), "decoder": cfg},
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = run(args.images, args.vocab, args.beam, args.max_len, args.reps, hidden_dim=args.hidden,
              embed_dim=args.embed, attention_dim=args.attention,
              feature_proj=None if args.feature_proj is None else (args.feature_proj or False))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
