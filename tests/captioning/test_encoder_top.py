"""The trainable encoder top: the cut cache, which parameters learn, serving the fine-tuned encoder, resume."""

import base64
import os
import subprocess
import sys
import textwrap

import mlflow
import pandas as pd
import pytest
import torch

from caption_fixtures import make_caption_inputs
from conftest import start_run_in_current_store
from llm_caption.captioning.decoding import decode_batched, ids_to_words
from llm_caption.captioning.encoder import build_encoder
from llm_caption.captioning.encoder_top import (CutEncoder, TopCaptioner, build_split, cut_to_grid,
                                                image_grouped_order, write_encoder_weights)
from llm_caption.captioning.features import FeatureCache, load_image
from llm_caption.captioning.models import build_decoder, caption_loss
from llm_caption.captioning.pyfunc import log_captioner
from llm_caption.captioning.training import CaptionData, CaptionSplit, TrainConfig, train_captioner
from llm_caption.captioning.transforms import build_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = {"name": "efficientnet_lite0"}
CUT = 5
KWARGS = {"embed_dim": 32, "hidden_dim": 48, "attention_dim": 32, "dropout": 0.2}
CFG = dict(epochs=3, batch_size=10, lr=3e-3, top_lr=1e-3, patience=10, max_decode_len=12, seed=5)
DECODING = {"beam_size": 2, "max_len": 12, "length_penalty": 0.7}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("top")
    inputs = make_caption_inputs(root, n_images=12, image_size=96)
    images = inputs["caption_images"].sort_values("image_id").reset_index(drop=True)
    return {"root": root, "inputs": inputs, "images": images,
            "transform": build_transform(inputs["image_transform_spec"])}


@pytest.fixture(scope="module")
def cut_cache(scenes):
    """The cut activations (fp32) of every scene through the feature cache."""
    _, bottom, _, _ = build_split(SPEC, CUT)
    images = scenes["images"]
    return FeatureCache(scenes["root"] / "cache").get_or_build(
        CutEncoder(bottom), {"name": "efficientnet_lite0", "cut_stage": CUT}, scenes["transform"],
        scenes["inputs"]["image_transform_spec"], images["image_id"].tolist(), images["image_path"].tolist(),
        batch_size=6, dtype="float32")


def _data(scenes, features: torch.Tensor) -> CaptionData:
    captions = scenes["inputs"]["captions_encoded"]
    rows = {image_id: i for i, image_id in enumerate(scenes["images"]["image_id"])}

    def split(name):
        part = captions[captions["split"] == name]
        return CaptionSplit(torch.tensor([rows[i] for i in part["image_id"]]),
                            torch.tensor([list(t) for t in part["token_ids"]]))

    val = captions[captions["split"] == "val"]
    refs = val.groupby("image_id")["caption"].apply(list)
    return CaptionData(features, split("train"), split("val"), torch.tensor([rows[i] for i in refs.index]),
                       refs.tolist(), scenes["inputs"]["caption_vocab"]["itos"], key="top-test")


def _top_model(vocab_size: int) -> TopCaptioner:
    torch.manual_seed(0)
    _, _, top, _ = build_split(SPEC, CUT)
    return TopCaptioner(top, build_decoder("show_attend_tell", vocab_size, 1280, **KWARGS))


@pytest.mark.parametrize("cut", [5, 6])
def test_cut_cache_reproduces_the_full_encoders_grid(scenes, tmp_path, cut):
    _, bottom, top, _ = build_split(SPEC, cut)
    images = scenes["images"]
    cached = FeatureCache(tmp_path).get_or_build(
        CutEncoder(bottom), {"name": "efficientnet_lite0", "cut_stage": cut}, scenes["transform"],
        scenes["inputs"]["image_transform_spec"], images["image_id"].tolist(), images["image_path"].tolist(),
        batch_size=5, dtype="float32")
    encoder, _ = build_encoder(SPEC)
    batch = torch.stack([scenes["transform"](load_image(p)) for p in images["image_path"]])
    with torch.inference_mode():
        full = encoder(batch).flatten(2).transpose(1, 2)
        from_cut = cut_to_grid(top, cached.features[:, 0], cached.grid_hw)
    assert from_cut.shape == full.shape
    assert float((from_cut - full).abs().max()) <= 1e-4
    assert float(full.abs().max()) > 1.0  # a real grid, not zeros


def test_gradients_reach_only_the_top_and_the_decoder_and_batch_norms_keep_their_statistics(scenes, cut_cache):
    model_full, bottom, top, _ = build_split(SPEC, CUT)
    model = TopCaptioner(top, build_decoder("show_attend_tell", len(scenes["inputs"]["caption_vocab"]["itos"]),
                                            1280, **KWARGS))
    stats = {k: v.clone() for k, v in model_full.state_dict().items() if "running" in k}
    data = _data(scenes, cut_cache.features)
    model.train()
    order = image_grouped_order(torch.arange(len(data.train.tokens)), data.train.image_rows,
                                torch.Generator().manual_seed(0))[:10]
    rows = data.train.image_rows[order]
    images, index = torch.unique(rows, return_inverse=True)
    assert len(images) < len(order)  # captions of an image share its top pass
    loss = caption_loss(model, data.features[images, 0], data.train.tokens[order], 0.1, index)
    loss.backward()
    assert all(p.grad is None for p in bottom.parameters())
    top_grads = [p.grad for p in top.parameters()]
    assert all(g is not None for g in top_grads) and all(float(g.abs().sum()) > 0 for g in top_grads)
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    for name, value in model_full.state_dict().items():
        if "running" in name:
            assert torch.equal(value, stats[name]), name
    assert not model.top.training and model.decoder.training


def test_image_grouped_order_keeps_each_images_captions_together():
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    order = image_grouped_order(torch.randperm(10, generator=torch.Generator().manual_seed(1)), rows,
                                torch.Generator().manual_seed(2))
    assert sorted(order.tolist()) == list(range(10))
    seen = rows[order].tolist()
    changes = sum(a != b for a, b in zip(seen, seen[1:]))
    assert changes == 3  # four images, each once


def test_runs_of_k_captions_per_image_spread_an_image_over_passes():
    rows = torch.arange(6).repeat_interleave(5)
    order = image_grouped_order(torch.randperm(30, generator=torch.Generator().manual_seed(0)), rows,
                                torch.Generator().manual_seed(3), per_image=2)
    assert sorted(order.tolist()) == list(range(30))
    seen = rows[order].tolist()
    assert seen[:12] == [r for r in seen[:12:2] for _ in (0, 1)]  # first pass: pairs of captions of each image
    assert sorted(seen[:12:2]) == list(range(6)) and sorted(seen[24:]) == list(range(6))  # last pass: one each
    single = rows[image_grouped_order(torch.randperm(30, generator=torch.Generator().manual_seed(0)), rows,
                                      torch.Generator().manual_seed(3), per_image=1)].tolist()
    assert all(sorted(single[i: i + 6]) == list(range(6)) for i in range(0, 30, 6))


@pytest.fixture(scope="module")
def trained(scenes, cut_cache, tmp_path_factory):
    data = _data(scenes, cut_cache.features)
    model = _top_model(len(data.itos))
    start = {k: v.clone() for k, v in model.top.state_dict().items()}
    folder = tmp_path_factory.mktemp("trained")
    result = train_captioner(model, data, TrainConfig(**CFG), folder)
    return {"model": model.eval(), "result": result, "start": start, "dir": folder, "data": data}


def test_the_top_trains_and_the_loss_falls(trained):
    moved = max(float((trained["model"].top.state_dict()[k].float() - v.float()).abs().max())
                for k, v in trained["start"].items() if v.is_floating_point())
    assert moved > 1e-4
    history = trained["result"].history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "val_cider_d" in history[-1]


def test_served_model_and_cli_caption_as_the_in_process_model(scenes, trained, tmp_path):
    model = trained["model"]
    paths = scenes["images"]["image_path"].tolist()[:3]
    transform = scenes["transform"]
    _, bottom, imagenet_top, _ = build_split(SPEC, CUT)
    with torch.inference_mode():
        cut = CutEncoder(bottom)(torch.stack([transform(load_image(p)) for p in paths])).flatten(2).transpose(1, 2)
        decoded = decode_batched(model, cut, beam_size=DECODING["beam_size"], max_len=DECODING["max_len"],
                                 length_penalty=DECODING["length_penalty"])
        assert not torch.allclose(model.grid(cut), cut_to_grid(imagenet_top, cut), atol=1e-3)  # the top moved
    itos = scenes["inputs"]["caption_vocab"]["itos"]
    expected = [" ".join(ids_to_words(t, itos)) for t in decoded.tokens]

    weights = write_encoder_weights(SPEC, CUT, model.top.state_dict(), tmp_path / "encoder_weights.pth")
    config = {"architecture": "show_attend_tell", "decoder": KWARGS, "encoder": SPEC,
              "transform_spec": scenes["inputs"]["image_transform_spec"], "decoding": DECODING}
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        mlflow.set_tracking_uri(tracking)
        try:
            with start_run_in_current_store():
                uri = log_captioner(model.decoder, config, scenes["inputs"]["caption_vocab"], weights)
            served = mlflow.pyfunc.load_model(uri)
        finally:
            mlflow.set_tracking_uri(previous)
    answer = served.predict(pd.DataFrame({"image": [base64.b64encode(open(p, "rb").read()).decode()
                                                    for p in paths]}))
    assert answer["error"].tolist() == [""] * len(paths)
    assert answer["caption"].tolist() == expected
    run = subprocess.run([sys.executable, "-m", "llm_caption.caption", *paths, "--model-uri", uri,
                          "--tracking-uri", tracking], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [line.split("\t")[1] for line in run.stdout.strip().splitlines()] == expected


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {helpers!r}]
    import torch
    from test_encoder_top import CFG, _top_model
    from llm_caption.captioning.training import CaptionData, CaptionSplit, TrainConfig, train_captioner
    torch.set_num_threads(int(sys.argv[3]))
    d = torch.load(sys.argv[1], weights_only=True)
    data = CaptionData(d["features"], CaptionSplit(d["train_rows"], d["train_tokens"]),
                       CaptionSplit(d["val_rows"], d["val_tokens"]), d["val_image_rows"], d["val_references"],
                       d["itos"], key=d["key"])
    model = _top_model(len(data.itos))
    def kill(epoch, record, sample):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    train_captioner(model, data, TrainConfig(**CFG), sys.argv[2], on_epoch_end=kill)
""").format(tests=os.path.dirname(__file__), helpers=os.path.dirname(os.path.dirname(__file__)))


def test_resume_after_a_kill_equals_the_uninterrupted_run(trained, tmp_path):
    data = trained["data"]
    data_file = tmp_path / "data.pt"
    torch.save({"features": data.features, "train_rows": data.train.image_rows, "train_tokens": data.train.tokens,
                "val_rows": data.val.image_rows, "val_tokens": data.val.tokens, "val_image_rows": data.val_image_rows,
                "val_references": data.val_references, "itos": data.itos, "key": data.key}, data_file)
    folder = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", CHILD, str(data_file), str(folder), str(torch.get_num_threads())],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2
    model = _top_model(len(data.itos))
    resumed = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert resumed.resumed_from_epoch == 2
    strip = [{k: v for k, v in h.items() if "time" not in k} for h in resumed.history]
    assert strip == [{k: v for k, v in h.items() if "time" not in k} for h in trained["result"].history]
    full = torch.load(trained["dir"] / "last.pt", weights_only=True)["model"]
    again = torch.load(folder / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("top.") for k in full)
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_scst_fine_tunes_the_top_too(scenes, trained, tmp_path):
    from llm_caption.captioning.scst import ScstConfig, train_scst

    data = trained["data"]
    model = _top_model(len(data.itos))
    model.load_state_dict(trained["model"].state_dict())
    start = {k: v.clone() for k, v in model.top.state_dict().items()}
    captions = scenes["inputs"]["captions_encoded"]
    rows = {image_id: i for i, image_id in enumerate(scenes["images"]["image_id"])}
    train = captions[captions["split"] == "train"].groupby("image_id")["caption"].apply(list)
    train_rows = torch.tensor([rows[i] for i in train.index])
    cfg = ScstConfig(epochs=1, batch_images=3, samples=2, lr=1e-3, top_lr=1e-3, max_len=12, patience=5, seed=3)
    result = train_scst(model, data, train_rows, train.tolist(), cfg, tmp_path / "scst")
    assert [int(h["epoch"]) for h in result.history] == [0, 1]
    last = torch.load(tmp_path / "scst" / "last.pt", weights_only=True)["model"]
    moved = max(float((last[f"top.{k}"].float() - v.float()).abs().max()) for k, v in start.items()
                if v.is_floating_point() and "running" not in k)
    assert moved > 0.0
    assert all(torch.equal(last[f"top.{k}"], v) for k, v in start.items() if "running" in k)  # BN statistics kept
