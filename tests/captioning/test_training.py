import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from caption_fixtures import make_caption_inputs
from llm_caption.captioning.encoder import build_encoder
from llm_caption.captioning.features import extract_features
from llm_caption.captioning.models import build_decoder
from llm_caption.captioning.training import CaptionData, CaptionSplit, TrainConfig, train_captioner
from llm_caption.captioning.transforms import build_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "cnn_transformer"
KWARGS = {"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64, "dropout": 0.2}
CFG = dict(epochs=4, batch_size=8, lr=3e-3, patience=10, max_decode_len=12, seed=7)


def save_data(data: CaptionData, path) -> None:
    """CaptionData as tensors and lists, so that it loads with ``weights_only=True``."""
    torch.save({"features": data.features, "train_rows": data.train.image_rows, "train_tokens": data.train.tokens,
                "val_rows": data.val.image_rows, "val_tokens": data.val.tokens, "val_image_rows": data.val_image_rows,
                "val_references": data.val_references, "itos": data.itos, "key": data.key}, path)


def load_data(path) -> CaptionData:
    d = torch.load(path, weights_only=True)
    return CaptionData(d["features"], CaptionSplit(d["train_rows"], d["train_tokens"]),
                       CaptionSplit(d["val_rows"], d["val_tokens"]), d["val_image_rows"], d["val_references"],
                       d["itos"], key=d["key"])


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
    save_data(data, path)
    return path


def _model(vocab_size):
    torch.manual_seed(0)
    return build_decoder(ARCH, vocab_size, 1280, **KWARGS)


def _strip_times(history):
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


@pytest.fixture(scope="module")
def full_run(data_file, tmp_path_factory):
    """An uninterrupted run of CFG: its result, final weights and checkpoint folder (do not modify; copy it)."""
    data = load_data(data_file)
    model = _model(len(data.itos))
    folder = tmp_path_factory.mktemp("full")
    result = train_captioner(model, data, TrainConfig(**CFG), folder)
    return {"result": result, "weights": {k: v.clone() for k, v in model.state_dict().items()}, "dir": folder}


def _assert_same_as_full(full_run, result, model):
    assert result.epochs_run == full_run["result"].epochs_run == 4
    assert _strip_times(result.history) == _strip_times(full_run["result"].history)
    for name, value in full_run["weights"].items():
        assert torch.equal(value, model.state_dict()[name]), name


CHILD_PRELUDE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path[:0] = [{tests!r}, {helpers!r}]
    from test_training import load_data
    from llm_caption.captioning.models import build_decoder
    from llm_caption.captioning.training import TrainConfig, train_captioner
    torch.set_num_threads(int(sys.argv[3]))  # same arithmetic as the uninterrupted run in the test process
    data = load_data(sys.argv[1])
    torch.manual_seed(0)
    model = build_decoder({arch!r}, len(data.itos), 1280, **{kwargs!r})
""").format(tests=os.path.dirname(__file__), helpers=os.path.dirname(os.path.dirname(__file__)), arch=ARCH,
           kwargs=KWARGS)

KILLED_AFTER_EPOCH_2 = CHILD_PRELUDE + textwrap.dedent("""
    def kill(epoch, record, sample):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    train_captioner(model, data, TrainConfig(**{cfg!r}), sys.argv[2], on_epoch_end=kill)
""").format(cfg=CFG)

# SIGKILL in the middle of writing epoch 3's checkpoint: half of its bytes reach the disk, then the process dies,
# as a crash or an OOM kill during the write would leave it.
KILLED_DURING_WRITE = CHILD_PRELUDE + textwrap.dedent("""
    import io
    real_save = torch.save
    last_writes = []
    def dying_save(obj, f, *args, **kwargs):
        target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
        if "last" in os.path.basename(str(target)):
            last_writes.append(target)
            if len(last_writes) == 3:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
                if hasattr(f, "write"):
                    f.write(data)
                    f.flush()
                else:
                    open(f, "wb").write(data)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = dying_save
    train_captioner(model, data, TrainConfig(**{cfg!r}), sys.argv[2])
""").format(cfg=CFG)


def _run_child(script, data_file, folder):
    return subprocess.run([sys.executable, "-c", script, str(data_file), str(folder), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300)


def test_resume_after_kill_matches_uninterrupted_run(data_file, full_run, tmp_path):
    data = load_data(data_file)
    killed = _run_child(KILLED_AFTER_EPOCH_2, data_file, tmp_path / "resumed")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 2

    resumed_model = _model(len(data.itos))
    resumed = train_captioner(resumed_model, data, TrainConfig(**CFG), tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2
    _assert_same_as_full(full_run, resumed, resumed_model)
    final_full = torch.load(full_run["dir"] / "last.pt", weights_only=True)["model"]
    final_resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert full_run["result"].history[-1]["train_loss"] < full_run["result"].history[0]["train_loss"]


def test_kill_during_checkpoint_write_resumes_from_the_last_complete_one(data_file, full_run, tmp_path, caplog):
    data = load_data(data_file)
    folder = tmp_path / "killed"
    killed = _run_child(KILLED_DURING_WRITE, data_file, folder)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2  # the half-written epoch 3 is not it
    assert list(folder.glob(".*tmp*")), "the partial write should be left in a temporary file"

    model = _model(len(data.itos))
    with caplog.at_level(logging.INFO, logger="llm_caption.captioning"):
        resumed = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert resumed.resumed_from_epoch == 2
    _assert_same_as_full(full_run, resumed, model)
    assert not list(folder.glob(".*tmp*"))
    assert "partial write" in caplog.text


def _copy_run(full_run, folder):
    shutil.copytree(full_run["dir"], folder)
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(data_file, full_run, tmp_path, caplog):
    data = load_data(data_file)
    folder = _copy_run(full_run, tmp_path / "ckpt")
    _truncate(folder / "last.pt")
    model = _model(len(data.itos))
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning"):
        result = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert f"checkpoint {folder / 'last.pt'} cannot be read safely" in caplog.text
    assert result.resumed_from_epoch == 3  # previous.pt: epoch 3; epoch 4 is trained again
    _assert_same_as_full(full_run, result, model)
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 4


def test_every_checkpoint_damaged_restarts_that_model(data_file, full_run, tmp_path, caplog):
    data = load_data(data_file)
    folder = _copy_run(full_run, tmp_path / "ckpt")
    _truncate(folder / "last.pt")
    (folder / "previous.pt").write_bytes(b"")
    _truncate(folder / "best.pt")
    model = _model(len(data.itos))
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning"):
        result = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert str(folder / "previous.pt") in caplog.text and "training from scratch" in caplog.text
    assert result.resumed_from_epoch == 0
    _assert_same_as_full(full_run, result, model)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch


def test_damaged_best_export_is_rewritten_from_the_checkpoint(data_file, full_run, tmp_path, caplog):
    data = load_data(data_file)
    folder = _copy_run(full_run, tmp_path / "ckpt")
    _truncate(folder / "best.pt")
    model = _model(len(data.itos))
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning"):
        result = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert result.resumed_from_epoch == 4 and f"{folder / 'best.pt'} was missing or damaged" in caplog.text
    # a finished model run again reports its training time (its epochs, from the checkpoint), not the rerun's
    assert result.train_time_s == full_run["result"].train_time_s > 0
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["epoch"] == full_run["result"].best_epoch
    for name, value in full_run["weights"].items():
        assert torch.equal(best["model"][name], value), name


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint would run on a pickle load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(data_file, full_run, tmp_path, caplog):
    data = load_data(data_file)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    real = torch.load(full_run["dir"] / "last.pt", weights_only=True)
    torch.save({**real, "history": _Payload(marker)}, folder / "last.pt")
    torch.save({**real, "model": _Payload(marker)}, folder / "previous.pt")
    model = _model(len(data.itos))
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning"):
        result = train_captioner(model, data, TrainConfig(**CFG), folder)
    assert not marker.exists(), "loading the checkpoint executed its pickle payload"
    assert f"checkpoint {folder / 'last.pt'} cannot be read safely" in caplog.text
    assert f"checkpoint {folder / 'previous.pt'} cannot be read safely" in caplog.text
    assert result.resumed_from_epoch == 0
    _assert_same_as_full(full_run, result, model)


def test_checkpoints_load_without_pickle(full_run):
    for name in ("last.pt", "previous.pt", "best.pt"):
        state = torch.load(full_run["dir"] / name, weights_only=True)
        assert "model" in state
    assert not list(full_run["dir"].glob(".*"))


def test_early_stopping_and_best_checkpoint(data_file, tmp_path):
    data = load_data(data_file)
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
    data = load_data(data_file)
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


def test_bf16_from_parameters_falls_back_to_fp32_without_native_bf16(caplog):
    from llm_caption.common import cpu_supports_bf16
    from llm_caption.captioning.scst import ScstConfig

    native = cpu_supports_bf16()
    with caplog.at_level("WARNING"):
        cfg = TrainConfig.from_params({"precision": "bf16"})
        scst = ScstConfig.from_params({"precision": "bf16"})
    assert cfg.precision == scst.precision == ("bf16" if native else "fp32")
    assert ("no native bf16" in caplog.text) is (not native)
    assert TrainConfig.from_params({"precision": "fp32"}).precision == "fp32"


class _Crash(RuntimeError):
    pass


def test_cosine_schedule_follows_the_steps_and_resumes_exactly(data_file, tmp_path):
    from llm_caption.captioning.training import cosine_factor

    data = load_data(data_file)
    cfg = TrainConfig(**{**CFG, "lr_schedule": "cosine", "min_lr_ratio": 0.1})
    model = _model(len(data.itos))
    full = train_captioner(model, data, cfg, tmp_path / "full")
    steps = -(-data.train.tokens.shape[0] // cfg.batch_size)
    total = cfg.epochs * steps
    lrs = [h["lr"] for h in full.history]
    assert lrs == pytest.approx([cfg.lr * cosine_factor(e * steps, total, 0.1) for e in range(cfg.epochs)])
    assert lrs[0] == pytest.approx(cfg.lr) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert cosine_factor(total, total, 0.1) == pytest.approx(0.1) == cosine_factor(total + 5, total, 0.1)
    opt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(cfg.lr * 0.1)  # the end of the cosine

    def crash(epoch, record, sample):
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train_captioner(_model(len(data.itos)), data, cfg, tmp_path / "resumed", on_epoch_end=crash)
    resumed_model = _model(len(data.itos))
    resumed = train_captioner(resumed_model, data, cfg, tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2
    assert _strip_times(resumed.history) == _strip_times(full.history)
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in model.state_dict().items())
    plateau = train_captioner(_model(len(data.itos)), data, TrainConfig(**CFG), tmp_path / "plateau")
    assert plateau.history[-1]["train_loss"] != full.history[-1]["train_loss"]
    with pytest.raises(ValueError, match="training.lr_schedule: 'linear'"):
        TrainConfig(lr_schedule="linear")
