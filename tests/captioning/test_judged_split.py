"""The registry's comparison key for caption figures names the validation images they were measured on."""

import pandas as pd

from llm_caption.captioning.experiment import judged_split, references
from llm_caption.registry import split_fingerprint


def _captions(val_ids: list[str]) -> pd.DataFrame:
    rows = [{"image_id": "t0", "split": "train", "caption": "a dog runs"}]
    rows += [{"image_id": i, "split": "val", "caption": f"caption {k}"} for i in val_ids for k in range(2)]
    return pd.DataFrame(rows)


def test_all_images_keep_the_whole_split_fingerprint():
    captions = _captions(["v3", "v1", "v2", "v4"])
    assert judged_split(captions, None) == split_fingerprint(["v1", "v2", "v3", "v4"])
    assert judged_split(captions, 4) == judged_split(captions, None)
    assert judged_split(captions, 10) == judged_split(captions, None)


def test_a_prefix_of_the_split_is_a_different_split():
    captions = _captions(["v3", "v1", "v2", "v4"])
    first_two = judged_split(captions, 2)
    assert first_two != judged_split(captions, None)
    assert first_two != judged_split(captions, 3)
    # the first images in the order the validation rows are decoded in (sorted image ids)
    assert list(references(captions, "val"))[:2] == ["v1", "v2"]
    assert first_two == split_fingerprint(["v1", "v2"])
