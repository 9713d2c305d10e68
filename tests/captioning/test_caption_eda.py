import numpy as np
import pandas as pd
from PIL import Image

from llm_caption.captioning import eda


def test_word_counts_and_stopwords():
    captions = ["a dog runs on the grass", "a dog and a cat"]
    assert eda.word_counts(captions)["a"] == 3
    stop = eda.english_stopwords()
    assert "the" in stop and "dog" not in stop
    counts = eda.word_counts(captions, stop)
    assert "a" not in counts and counts["dog"] == 2


def test_figures_render(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    images = pd.DataFrame({"image_id": [f"im{i}.png" for i in range(6)], "image_path": paths,
                           "split": ["train"] * 5 + ["test"], "width": 30, "height": 20})
    captions = pd.DataFrame({"image_id": [f"im{i % 6}.png" for i in range(12)],
                             "caption": [f"a shape number {'x ' * i}".strip() for i in range(12)]})
    figs = [eda.caption_length_figure(captions, max_len=8),
            eda.word_frequency_figure(captions["caption"], top_k=3),
            eda.caption_samples_figure(images, captions, n=5, seed=0)]
    for k, fig in enumerate(figs):
        fig.savefig(tmp_path / f"f{k}.png")
        assert (tmp_path / f"f{k}.png").stat().st_size > 1000
    bars = figs[1].axes[0].patches
    assert len(bars) == 3
    titles = [ax.get_title() for ax in figs[2].axes if ax.get_title()]
    assert titles == [f"im{i}.png" for i in range(5)]  # only train images, in order
