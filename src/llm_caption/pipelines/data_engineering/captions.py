"""data_engineering, captions branch: a captioned-image folder -> validated, split, encoded data + EDA.

Source (``caption_data.source``): ``synthetic`` scenes generated into ``caption_data.data_dir``, or an
existing ``folder`` (Flickr8k, Kaggle or original layout). The domain logic lives in
``llm_caption.captioning``; the nodes here only wire it to parameters and catalog datasets.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from kedro.pipeline import Pipeline, node
from matplotlib.figure import Figure

from llm_caption.captioning import eda
from llm_caption.captioning.sources import prepare_source, read_caption_source
from llm_caption.captioning.transforms import make_transform_spec
from llm_caption.captioning.validation import assemble_caption_dataset, check_rejected_share
from llm_caption.captioning.vocab import Vocabulary

logger = logging.getLogger(__name__)

REJECTED_COLUMNS = ["kind", "source", "line", "image", "reason", "record"]
REJECTED_PATH = ("the caption_rejected dataset (02_intermediate/rejected_captions.jsonl under the "
                 "environment's data_root)")


def prepare_caption_source(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Make sure the caption folder exists (generating synthetic scenes if so configured).

    Returns ``{"kind", "data_dir", ...}``; fails naming ``caption_data.data_dir`` if a folder is missing.
    """
    return prepare_source(params["source"], params["data_dir"], params.get("synthetic"), seed)


def read_and_validate_captions(source_info: dict[str, Any], params: dict[str, Any],
                               seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Parse the folder, validate every image, split by image.

    Returns (valid images, accepted cleaned captions, every rejected record, counts).
    """
    source = read_caption_source(source_info["data_dir"], params.get("layout", "auto"))
    result = assemble_caption_dataset(source, params.get("split_shares", (0.8, 0.1, 0.1)), seed,
                                      int(params.get("validation_workers", 4)))
    rejected = pd.DataFrame(result.rejected, columns=REJECTED_COLUMNS).astype({"line": "Int64"})
    result.counts["layout"] = source.layout
    result.counts["data_dir"] = str(source.data_dir)
    return result.images, result.captions, rejected, result.counts


def check_rejection_budget(counts: dict[str, Any], images: pd.DataFrame, captions: pd.DataFrame,
                           params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pass images and captions through, or fail with one message when too much was rejected
    (``caption_data.max_rejected_share``). Runs after the rejected records are saved."""
    check_rejected_share(counts, float(params.get("max_rejected_share", 0.2)), REJECTED_PATH)
    return images, captions


def build_caption_vocab(captions: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """Vocabulary from the train split only (``min_word_count``), as the ``caption_vocab`` JSON."""
    train = captions.loc[captions["split"] == "train", "caption"]
    vocab = Vocabulary.build(train, min_count=int(params["min_word_count"]), max_len=int(params["max_len"]))
    logger.info("Caption vocabulary: %d entries (min count %d, from %d train captions)",
                len(vocab), vocab.min_count, len(train))
    return vocab.to_dict()


def encode_captions(captions: pd.DataFrame, vocab: dict[str, Any]) -> pd.DataFrame:
    """Add ``token_ids`` (fixed length ``max_len``), ``n_words`` and ``truncated`` to each caption."""
    v = Vocabulary.from_dict(vocab)
    encoded = [v.encode_with_info(c) for c in captions["caption"]]
    out = captions[["image_id", "split", "caption_raw", "caption"]].copy()
    out["token_ids"] = [ids for ids, _ in encoded]
    out["n_words"] = out["caption"].str.split().str.len().astype("int64")
    out["truncated"] = [t for _, t in encoded]
    logger.info("Encoded %d captions to %d ids; %.2f%% truncated", len(out), v.max_len,
                100 * out["truncated"].mean() if len(out) else 0.0)
    return out


def make_image_transform_spec(params: dict[str, Any]) -> dict[str, Any]:
    """The ``image_transform_spec`` JSON from ``caption_data.image_transform``."""
    return make_transform_spec(params.get("image_transform"))


def build_caption_report(counts: dict[str, Any], vocab: dict[str, Any], encoded: pd.DataFrame,
                         images: pd.DataFrame) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``caption_data_report`` JSON and the same figures as MLflow metrics."""
    n_words = encoded["n_words"]
    report = {
        "source": {"layout": counts["layout"], "data_dir": counts["data_dir"], "split_source": counts["split_source"]},
        "counts": {k: counts[k] for k in ("input_captions", "accepted_captions", "rejected_captions",
                                          "input_images", "accepted_images", "rejected_images")},
        "rejected_captions_by_reason": counts["rejected_captions_by_reason"],
        "rejected_images_by_reason": counts["rejected_images_by_reason"],
        "vocab_size": len(vocab["itos"]),
        "min_word_count": vocab["min_count"],
        "max_len": vocab["max_len"],
        "truncated_share": float(encoded["truncated"].mean()) if len(encoded) else 0.0,
        "split_images": {s: int((images["split"] == s).sum()) for s in ("train", "val", "test")},
        "split_captions": {s: int((encoded["split"] == s).sum()) for s in ("train", "val", "test")},
        "words_per_caption": {"mean": float(n_words.mean()), "median": float(n_words.median()),
                              "p95": float(n_words.quantile(0.95)), "max": int(n_words.max())} if len(n_words) else {},
    }
    flat = {**report["counts"], "vocab_size": report["vocab_size"], "truncated_share": report["truncated_share"],
            **{f"rejected_captions.{k}": v for k, v in report["rejected_captions_by_reason"].items()},
            **{f"rejected_images.{k}": v for k, v in report["rejected_images_by_reason"].items()},
            **{f"split_images.{k}": v for k, v in report["split_images"].items()}}
    metrics = {k: {"value": float(v), "step": 0} for k, v in flat.items()}
    return report, metrics


def plot_caption_lengths(encoded: pd.DataFrame, vocab: dict[str, Any]) -> Figure:
    """Caption-length scatter and histogram with the ``max_len`` cut-off."""
    return eda.caption_length_figure(encoded, int(vocab["max_len"]))


def plot_word_frequencies(encoded: pd.DataFrame, params: dict[str, Any]) -> tuple[Figure, Figure]:
    """Top-k train words, with and without English stop words."""
    top_k = int(params.get("eda", {}).get("top_k_words", 30))
    train = encoded.loc[encoded["split"] == "train", "caption"]
    return (eda.word_frequency_figure(train, top_k, title="Most frequent words (train)"),
            eda.word_frequency_figure(train, top_k, eda.english_stopwords(),
                                      title="Most frequent words without stop words (train)"))


def plot_caption_samples(images: pd.DataFrame, encoded: pd.DataFrame, params: dict[str, Any], seed: int) -> Figure:
    """A grid of sample images with their captions."""
    return eda.caption_samples_figure(images, encoded, int(params.get("eda", {}).get("n_samples", 5)), seed)


def create_captions_pipeline() -> Pipeline:
    """The caption branch of data_engineering (outputs in docs/datasets.md); every node is tagged
    ``caption_data``, so ``kedro run --pipeline=data_engineering --tags=caption_data`` runs this branch alone."""
    return Pipeline([
        node(prepare_caption_source, ["params:caption_data", "params:seed"], "caption_source_info",
             name="prepare_caption_source"),
        node(read_and_validate_captions, ["caption_source_info", "params:caption_data", "params:seed"],
             ["caption_images_checked", "captions_checked", "caption_rejected", "caption_validation_counts"],
             name="read_and_validate_captions"),
        node(check_rejection_budget,
             ["caption_validation_counts", "caption_images_checked", "captions_checked", "params:caption_data"],
             ["caption_images", "captions_accepted"], name="check_caption_rejection_budget"),
        node(build_caption_vocab, ["captions_accepted", "params:caption_data"], "caption_vocab",
             name="build_caption_vocab"),
        node(encode_captions, ["captions_accepted", "caption_vocab"], "captions_encoded", name="encode_captions"),
        node(make_image_transform_spec, "params:caption_data", "image_transform_spec",
             name="make_image_transform_spec"),
        node(build_caption_report, ["caption_validation_counts", "caption_vocab", "captions_encoded", "caption_images"],
             ["caption_data_report", "caption_data_metrics"], name="build_caption_report"),
        node(plot_caption_lengths, ["captions_encoded", "caption_vocab"], "caption_length_plot",
             name="plot_caption_lengths"),
        node(plot_word_frequencies, ["captions_encoded", "params:caption_data"],
             ["caption_word_freq_plot", "caption_word_freq_nostop_plot"], name="plot_caption_word_frequencies"),
        node(plot_caption_samples, ["caption_images", "captions_encoded", "params:caption_data", "params:seed"],
             "caption_samples_plot", name="plot_caption_samples"),
    ], tags="caption_data")
