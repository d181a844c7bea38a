"""Backbones: feature sizes, first-convolution adaptation checked against torchvision's own
networks, weights files of every accepted kind, and errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cytopretrain.core.errors import WeightsError
from cytopretrain.learning.models import (
    TORCHVISION_BACKBONES,
    InferenceBackbone,
    build_backbone,
    load_backbone,
    save_backbone,
)
from cytopretrain.learning.pretext import build_method

# Pooled feature sizes as torchvision documents the networks' classifier inputs.
FEATURE_DIM = {"efficientnet_b0": 1280, "resnet18": 512, "resnet50": 2048, "densenet121": 1024}
HEAD = {"efficientnet_b0": "classifier", "resnet18": "fc", "resnet50": "fc", "densenet121": "classifier"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchvision_network(name: str, seed: int = 0) -> nn.Module:
    """A random torchvision network with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    network = getattr(torchvision.models, name)(weights=None)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def pooled_features(network: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward with the head replaced by identity: the pooled features."""
    setattr(network, HEAD[name], nn.Identity())
    with torch.no_grad():
        return network(x)


def test_backbone_names_match_documented_sizes():
    assert set(TORCHVISION_BACKBONES) == set(FEATURE_DIM)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("in_channels", [1, 2, 3])
def test_small_backbones_give_pooled_features(name, in_channels):
    backbone = build_backbone(name, in_channels=in_channels).eval()
    x = torch.rand(2, in_channels, 40, 36)
    with torch.no_grad():
        features, maps = backbone(x), backbone.forward_maps(x)
    assert features.shape == (2, FEATURE_DIM[name]) == (2, backbone.feature_dim)
    assert maps.shape == (2, FEATURE_DIM[name], 2, 2)  # stride 32, padded: ceil(40/32), ceil(36/32)
    torch.testing.assert_close(features, maps.mean(dim=(2, 3)))
    assert backbone.first_conv.in_channels == in_channels == backbone.in_channels
    assert backbone.name == name


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_large_backbones_one_forward(name):
    backbone = build_backbone(name, in_channels=2).eval()
    with torch.no_grad():
        features = backbone(torch.rand(2, 2, 32, 32))
    assert features.shape == (2, FEATURE_DIM[name])
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_random_init_changes_only_the_first_convolution(name):
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    own = build_backbone(name, in_channels=2).state_dict()
    head = HEAD[name] + "."
    assert set(own) == {k for k in reference if not k.startswith(head)}
    changed = {k for k in own if own[k].shape != reference[k].shape}
    assert len(changed) == 1
    (key,) = changed
    out_channels, _, kh, kw = reference[key].shape
    assert own[key].shape == (out_channels, 2, kh, kw)


def test_input_checks():
    backbone = build_backbone("resnet18", in_channels=1)
    with pytest.raises(ValueError, match="16 px"):
        backbone(torch.rand(2, 1, 15, 40))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        backbone(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", in_channels=0)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_first_conv_adaptation_reproduces_rgb_features_of_grey_images(tmp_path, name):
    network = torchvision_network(name)
    path = tmp_path / f"{name}.pth"
    torch.save(network.state_dict(), path)  # full torchvision state dict, head included
    grey = torch.rand(2, 1, 48, 48)
    expected = pooled_features(network, name, grey.repeat(1, 3, 1, 1))
    for in_channels in (1, 2, 3):
        backbone = build_backbone(name, in_channels=in_channels, weights=path).eval()
        with torch.no_grad():
            got = backbone(grey.repeat(1, in_channels, 1, 1))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# BatchNorms that do not follow a convolution: DenseNet's pre-activation norms (after a
# concatenation, or the last block's output); every other one is folded.
UNFOLDED_NORMS = {
    "efficientnet_b0": set(),
    "resnet18": set(),
    "resnet50": set(),
    "densenet121": {"norm1", "norm", "norm5"},
}


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_inference_copy_folds_batchnorm_and_keeps_the_features(tmp_path, name):
    path = tmp_path / f"{name}.pth"
    torch.save(torchvision_network(name).state_dict(), path)  # BatchNorm statistics far from 0 / 1
    backbone = build_backbone(name, in_channels=2, weights=path)
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    folded = InferenceBackbone(backbone)
    assert backbone.training and not folded.training  # the source keeps its mode
    norms = {n.rsplit(".", 1)[-1] for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms == UNFOLDED_NORMS[name]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < sum(
        isinstance(m, nn.BatchNorm2d) for m in backbone.modules()
    )
    x = torch.rand(3, 2, 40, 44)
    with torch.no_grad():
        got = folded(x)
        expected = backbone.eval()(x)
    assert got.shape == (3, FEATURE_DIM[name]) and (folded.in_channels, folded.feature_dim) == (2, FEATURE_DIM[name])
    # float rounding only: folded weights round differently, by ~1e-6 of the feature scale
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        folded(torch.rand(1, 3, 40, 40))


def test_legacy_densenet_key_names_load(tmp_path):
    network = torchvision_network("densenet121")
    state = network.state_dict()
    # Old torchvision files spell "norm1" as "norm.1" inside dense layers and predate the
    # BatchNorm num_batches_tracked counters.
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet_legacy.pth"
    torch.save(legacy, path)
    loaded = build_backbone("densenet121", in_channels=3, weights=path).state_dict()
    for key, value in loaded.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dicts_load(tmp_path, wrapper):
    network = torchvision_network("resnet18")
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: network.state_dict(), "epoch": 3}, path)
    loaded = build_backbone("resnet18", in_channels=3, weights=path).state_dict()
    torch.testing.assert_close(loaded["layer4.1.conv2.weight"], network.state_dict()["layer4.1.conv2.weight"])
    torch.testing.assert_close(loaded["bn1.running_var"], network.bn1.running_var)


def test_pretext_method_checkpoint_gives_its_encoder(tmp_path):
    method = build_method("byol", build_backbone("resnet18", in_channels=1), projection_dim=8, hidden_dim=8)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.5)  # online and target encoders now differ: the online one must be loaded
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": method.state_dict(), "step": 10}, path)
    loaded = build_backbone("resnet18", in_channels=1, weights=path).state_dict()
    for key, value in method.backbone.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    state = {k: v for k, v in torchvision_network("resnet18").state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old_format.pth"
    torch.save(state, path)
    loaded = build_backbone("resnet18", in_channels=3, weights=path).state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"])


def test_save_and_load_round_trip(tmp_path):
    backbone = build_backbone("resnet18", in_channels=2)
    backbone.train()
    with torch.no_grad():
        backbone(torch.rand(4, 2, 32, 32))  # moves BatchNorm statistics away from their init
    path = tmp_path / "run" / "backbone.pt"
    save_backbone(backbone, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.pt"]  # no temporary left
    restored = load_backbone(path, "resnet18", in_channels=2)
    for key, value in backbone.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # The same file into a 1-channel backbone: a grey image gives the 2-channel features.
    grey = torch.rand(2, 1, 32, 32)
    single = load_backbone(path, "resnet18", in_channels=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(single(grey), backbone.eval()(grey.repeat(1, 2, 1, 1)), rtol=1e-4, atol=1e-5)


def assert_weights_error(path: Path, name: str, *fragments: str) -> None:
    with pytest.raises(WeightsError) as caught:
        build_backbone(name, in_channels=1, weights=path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    state = torchvision_network("resnet18").state_dict()
    resnet_file = tmp_path / "resnet18.pth"
    torch.save(state, resnet_file)
    assert_weights_error(resnet_file, "efficientnet_b0", "missing keys", "unexpected keys", "features.0.0.weight")

    extra = tmp_path / "extra.pth"
    torch.save({**state, "extra.weight": torch.zeros(3)}, extra)
    assert_weights_error(extra, "resnet18", "unexpected keys (1): extra.weight")

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, missing)
    assert_weights_error(missing, "resnet18", "missing keys (1): layer1.0.conv1.weight")

    reshaped = tmp_path / "reshaped.pth"
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(1)}, reshaped)
    assert_weights_error(reshaped, "resnet18", "shape mismatches", "layer1.0.conv1.weight")


def test_unreadable_weights_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert_weights_error(text, "resnet18", "not a readable state dict")

    whole_model = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None), whole_model)  # a pickled module, not weights
    assert_weights_error(whole_model, "resnet18", "not a readable state dict")

    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    assert_weights_error(listing, "resnet18", "state dict of named tensors")

    assert_weights_error(tmp_path / "absent.pt", "resnet18", "does not exist")
