import pytest
import torch
from torch import nn

from llm_caption.captioning.encoder import ENCODERS, build_encoder, encoder_fingerprint, load_state_dict_in_order, pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lite0():
    return build_encoder({"name": "efficientnet_lite0"})


def test_lite0_grid_and_pooled_shapes(lite0):
    encoder, weights = lite0
    grid = encoder(torch.randn(2, 3, 224, 224))
    assert grid.shape == (2, 1280, 7, 7)
    assert pool(grid).shape == (2, 1280)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    assert encoder_fingerprint({"name": "efficientnet_lite0"}, weights)["weights_sha256"]


def test_grid_resampled_to_14(lite0):
    encoder, weights = build_encoder({"name": "efficientnet_lite0", "grid_size": 14})
    assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 14, 14)


def test_imagenet_weights_are_loaded_not_random(lite0):
    encoder, _ = lite0
    again, _ = build_encoder({"name": "efficientnet_lite0"})
    x = torch.randn(1, 3, 96, 96)
    assert torch.equal(encoder(x), again(x))  # same packaged weights, no random init left


def test_fine_tune_blocks_unfreezes_only_the_last_blocks():
    encoder, _ = build_encoder({"name": "efficientnet_lite0", "fine_tune_blocks": 1})
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".blocks.6." in n for n in trainable)


def test_in_order_loading_rejects_shape_mismatch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    good = {"a": torch.zeros(4, 3), "b": torch.zeros(4), "c": torch.ones(2, 4), "d": torch.ones(2)}
    load_state_dict_in_order(model, good, "good.pth")
    assert torch.equal(model[1].weight, torch.ones(2, 4))
    bad = {"a": torch.zeros(4, 3), "b": torch.zeros(4), "c": torch.ones(4, 2), "d": torch.ones(2)}
    with pytest.raises(ValueError, match=r"bad.pth: tensor #2 'c' has shape \(4, 2\)"):
        load_state_dict_in_order(model, bad, "bad.pth")
    with pytest.raises(ValueError, match="3 tensors"):
        load_state_dict_in_order(model, dict(list(good.items())[:3]), "short.pth")


def test_registry_and_unknown_name():
    assert {"efficientnet_lite0", "resnet50", "efficientnet_b0"} <= set(ENCODERS)
    with pytest.raises(ValueError, match="unknown encoder 'vgg'"):
        build_encoder({"name": "vgg"})
    with pytest.raises(ValueError, match="weights_path"):
        build_encoder({"name": "resnet50"})


def test_torchvision_encoder_loads_a_local_checkpoint(tmp_path):
    import torchvision

    ckpt = tmp_path / "effb0.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), ckpt)
    encoder, weights = build_encoder({"name": "efficientnet_b0", "weights_path": str(ckpt)})
    assert weights == str(ckpt) and encoder.out_channels == 1280
    assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
