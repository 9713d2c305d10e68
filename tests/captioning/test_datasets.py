"""The caption study's catalog datasets: the feature cache and the trained captioners load back as objects."""

import json

import numpy as np
import pytest
import torch
from kedro.io import DatasetError

from llm_caption.captioning.datasets import CaptionModelsDataset, FeatureCacheDataset, FeatureSet
from llm_caption.captioning.features import FeatureCache


def _entry(root, key="k1") -> FeatureSet:
    feats = np.arange(3 * 1 * 4 * 2, dtype=np.float16).reshape(3, 1, 4, 2)
    folder = root / key
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", feats)
    (folder / "meta.json").write_text(json.dumps({"image_ids": ["a", "b", "c"], "grid_hw": [2, 2], "views": 1,
                                                  "seconds_per_image": 0.5, "shape": list(feats.shape)}))
    cached = FeatureCache(root).load(key)
    info = {"root": str(root), "key": key, "grid_hw": [2, 2], "channels": 2, "seconds_per_image": 0.5,
            "encoder_weights": "w.pt", "encoder": {"name": "x"}}
    return FeatureSet(cached, info)


def test_feature_cache_dataset_saves_the_description_and_loads_the_grids(tmp_path):
    entry = _entry(tmp_path / "cache")
    dataset = FeatureCacheDataset(filepath=str(tmp_path / "04_feature/caption_feature_cache.json"))
    assert not dataset.exists()
    dataset.save(entry)
    assert json.loads((tmp_path / "04_feature/caption_feature_cache.json").read_text()) == entry.info
    loaded = dataset.load()
    assert torch.equal(loaded.cached.features, entry.cached.features)
    assert loaded.channels == 2 and loaded.cached.image_ids == ["a", "b", "c"]
    assert torch.equal(loaded.rows(["c", "a"]), entry.cached.features[[2, 0], 0])


def test_feature_cache_dataset_names_itself_when_nothing_was_built(tmp_path):
    with pytest.raises(DatasetError, match="caption_feature_cache: .* does not exist; run the node "
                                           "build_caption_feature_cache"):
        FeatureCacheDataset(filepath=str(tmp_path / "missing.json")).load()


def test_caption_models_dataset_round_trip(tmp_path):
    dataset = CaptionModelsDataset(path=str(tmp_path / "models"))
    with pytest.raises(DatasetError, match="caption_models: no trained captioner"):
        dataset.load()
    weights = {"show_tell": {"model": {"w": torch.ones(2, 3)}, "epoch": 2, "val_bleu4": 0.25},
               "cnn_transformer": {"model": {"w": torch.zeros(1)}, "epoch": 1, "val_bleu4": 0.5}}
    dataset.save(weights)
    assert (tmp_path / "models/show_tell/best.pt").is_file() and dataset.exists()
    loaded = dataset.load()
    assert sorted(loaded) == ["cnn_transformer", "show_tell"]
    assert torch.equal(loaded["show_tell"]["model"]["w"], torch.ones(2, 3)) and loaded["show_tell"]["epoch"] == 2
