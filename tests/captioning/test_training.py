import subprocess
import sys
import textwrap

import pytest
import torch

from caption_fixtures import make_caption_inputs, one_torch_thread  # noqa: F401
from llm_caption.captioning.encoder import build_encoder
from llm_caption.captioning.features import extract_features
from llm_caption.captioning.models import build_decoder
from llm_caption.captioning.training import CaptionData, CaptionSplit, TrainConfig, train_captioner
from llm_caption.captioning.transforms import build_transform

ARCH = "cnn_transformer"
KWARGS = {"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64, "dropout": 0.2}
CFG = dict(epochs=4, batch_size=8, lr=3e-3, patience=10, max_decode_len=12, seed=7)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """CaptionData from real features of 12 synthetic scenes, saved for a child process."""
    root = tmp_path_factory.mktemp("train")
    inputs = make_caption_inputs(root, n_images=12, image_size=64)
    images, captions = inputs["caption_images"], inputs["captions_encoded"]
    encoder, _ = build_encoder({"name": "efficientnet_lite0"})
    feats, _, _ = extract_features(encoder, images["image_path"].tolist(), build_transform(inputs["image_transform_spec"]), 12, views=2)
    rows = {image_id: i for i, image_id in enumerate(images["image_id"])}

    def split(name):
        part = captions[captions["split"] == name]
        return CaptionSplit(torch.tensor([rows[i] for i in part["image_id"]]),
                            torch.tensor([list(t) for t in part["token_ids"]]))

    val = captions[captions["split"] == "val"]
    refs = val.groupby("image_id")["caption"].apply(list)
    data = CaptionData(torch.from_numpy(feats), split("train"), split("val"),
                       torch.tensor([rows[i] for i in refs.index]), refs.tolist(), inputs["caption_vocab"]["itos"],
                       key="test")
    path = root / "data.pt"
    torch.save(data, path)
    return path


def _model(vocab_size):
    torch.manual_seed(0)
    return build_decoder(ARCH, vocab_size, 1280, **KWARGS)


def _strip_times(history):
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from llm_caption.captioning.models import build_decoder
    from llm_caption.captioning.training import TrainConfig, train_captioner
    torch.set_num_threads(int(sys.argv[3]))  # same arithmetic as the uninterrupted run in the test process
    data = torch.load(sys.argv[1], weights_only=False)
    torch.manual_seed(0)
    model = build_decoder({arch!r}, len(data.itos), 1280, **{kwargs!r})
    def kill(epoch, record):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    train_captioner(model, data, TrainConfig(**{cfg!r}), sys.argv[2], on_epoch_end=kill)
""").format(arch=ARCH, kwargs=KWARGS, cfg=CFG)


def test_resume_after_kill_matches_uninterrupted_run(data_file, tmp_path):
    data = torch.load(data_file, weights_only=False)
    full_model = _model(len(data.itos))
    full = train_captioner(full_model, data, TrainConfig(**CFG), tmp_path / "full")

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(data_file), str(tmp_path / "resumed"),
                             str(torch.get_num_threads())],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 2

    resumed_model = _model(len(data.itos))
    resumed = train_captioner(resumed_model, data, TrainConfig(**CFG), tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == full.epochs_run == 4
    assert _strip_times(resumed.history) == _strip_times(full.history)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    final_full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    final_resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]


def test_early_stopping_and_best_checkpoint(data_file, tmp_path):
    data = torch.load(data_file, weights_only=False)
    model = _model(len(data.itos))
    result = train_captioner(model, data, TrainConfig(**{**CFG, "epochs": 6, "lr": 0.0, "patience": 1}),
                             tmp_path / "ckpt")
    assert result.epochs_run == 2  # BLEU cannot improve with lr 0: stop after patience 1
    assert result.best_epoch == 1
    best = torch.load(result.best_checkpoint, weights_only=True)
    assert best["epoch"] == 1 and best["val_bleu4"] == result.best_val_bleu4
    with pytest.raises(ValueError, match="unknown keys \\['epoch'\\]"):
        TrainConfig.from_params({"epoch": 3})


def test_bf16_autocast_trains_and_is_deterministic(data_file, tmp_path):
    data = torch.load(data_file, weights_only=False)
    cfg = TrainConfig(**{**CFG, "epochs": 2, "precision": "bf16"})
    runs = []
    for name in ("a", "b"):
        model = _model(len(data.itos))
        runs.append((model, train_captioner(model, data, cfg, tmp_path / name, resume=False)))
    (model_a, a), (model_b, b) = runs
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert _strip_times(a.history) == _strip_times(b.history)
    assert all(p.dtype == torch.float32 for p in model_a.parameters())  # autocast leaves the weights in fp32
    fp32 = train_captioner(_model(len(data.itos)), data, TrainConfig(**{**CFG, "epochs": 2}), tmp_path / "fp32")
    assert fp32.history[0]["train_loss"] != a.history[0]["train_loss"]  # bf16 matmuls really ran
    with pytest.raises(ValueError, match="training.precision: 'fp16'"):
        TrainConfig(precision="fp16")
