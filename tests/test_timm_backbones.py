"""timm backbones (learning.models.TimmBackbone): the Backbone contract at several input sizes,
feature extraction of real BBBC021 cells at two sizes against a direct recipe, weights from
timm files (.safetensors, .pth) and DINO-style checkpoints equal to timm's own model, ViT
feature pooling, and the input checks."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from cell_images import BBBC_CELLS
from safetensors.torch import save_file

from cytopretrain.core.errors import WeightsError
from cytopretrain.evaluation.features import extract_features
from cytopretrain.learning.models import TIMM_BACKBONES, InferenceBackbone, build_backbone
from cytopretrain.learning.pretext import build_method

FEATURE_DIM = {
    "vit_tiny_patch16": 192,
    "vit_tiny_patch8": 192,
    "vit_small_patch16": 384,
    "vit_small_patch8": 384,
    "vit_base_patch16": 768,
    "convnext_tiny": 768,
}
PATCH = {name: int(name[-2:].lstrip("h")) for name in FEATURE_DIM if name.startswith("vit_")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def timm_model(name: str, in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    """timm's own network of our ``name``, with its 1000-class head, in eval mode."""
    torch.manual_seed(seed)
    timm_name, options = TIMM_BACKBONES[name]
    if name.startswith("vit_"):  # timm's own answer for inputs other than 224 px
        options = {**options, "dynamic_img_size": True}
    return timm.create_model(timm_name, pretrained=False, in_chans=in_chans, **options).eval()


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The feature timm's model gives before its classifier: the CLS token of a ViT, the
    pooled and normalised map of ConvNeXt."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_names_match_documented_sizes():
    assert set(TIMM_BACKBONES) == set(FEATURE_DIM)


@pytest.mark.parametrize("name", sorted(FEATURE_DIM))
def test_contract_at_two_input_sizes(name):
    backbone = build_backbone(name, in_channels=2).eval()
    assert backbone.feature_dim == FEATURE_DIM[name] and backbone.in_channels == 2
    assert backbone.input_multiple == PATCH.get(name, 1)
    assert backbone.min_input_size == PATCH.get(name, 32)
    for height, width in ((32, 32), (48, 64)):
        with torch.no_grad():
            features = backbone(torch.rand(2, 2, height, width))
        assert features.shape == (2, FEATURE_DIM[name]) and torch.isfinite(features).all()


@pytest.fixture(scope="module")
def cell_table() -> pd.DataFrame:
    """6 real BBBC021 cells (68 x 68 px, DAPI / tubulin / actin in one .npy each)."""
    if not (BBBC_CELLS / "cells.csv").is_file():
        pytest.skip(f"real test data not found: {BBBC_CELLS}")
    cells = pd.read_csv(BBBC_CELLS / "cells.csv").head(6)
    return pd.DataFrame(
        {
            "idx": [f"cell{i}" for i in range(len(cells))],
            "channel_paths": [[str(BBBC_CELLS / f)] for f in cells.file],
            "channels": "dna|tubulin|actin",
            "phenotype": cells.moa.tolist(),
        }
    )


def direct_features(table: pd.DataFrame, backbone, resize: int | None) -> np.ndarray:
    """The extraction recipe written out: per channel np.percentile 0.1 / 99.9 scaling,
    optional antialiased resize, zero padding centred up to the patch multiple, the grey plane
    repeated over the backbone's channels, features concatenated in channel order."""
    rows = []
    for (path,) in table["channel_paths"]:
        image = np.load(path).astype(np.float64)
        per_channel = []
        for c in range(image.shape[2]):
            low, high = np.percentile(image[:, :, c], [0.1, 99.9])
            plane = torch.from_numpy(np.clip((image[:, :, c] - low) / (high - low), 0, 1)).float()[None, None]
            if resize is not None:
                plane = F.interpolate(plane, size=(resize, resize), mode="bilinear", antialias=True)
            multiple = backbone.input_multiple
            height, width = plane.shape[2:]
            pad_h, pad_w = -height % multiple, -width % multiple
            plane = F.pad(plane, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            with torch.no_grad():
                per_channel.append(backbone.eval()(plane.expand(-1, backbone.in_channels, -1, -1))[0].numpy())
        rows.append(np.concatenate(per_channel))
    return np.stack(rows)


@pytest.mark.parametrize("name", sorted(FEATURE_DIM))
def test_feature_extraction_of_real_cells_at_two_sizes(cell_table, name):
    backbone = build_backbone(name, in_channels=1, pool="cls+mean" if name == "vit_tiny_patch8" else None)
    for resize in (None, 32):  # native 68 px (padded to the patch multiple for ViTs) and 32 px
        profiles, failures = extract_features(cell_table, backbone, channel_mode="concat", resize=resize)
        assert failures.empty
        features = profiles[[c for c in profiles.columns if not c.startswith("Metadata_")]].to_numpy()
        assert features.shape == (len(cell_table), 3 * backbone.feature_dim)
        assert profiles.columns[-1] == f"f_actin_{backbone.feature_dim - 1}"
        np.testing.assert_allclose(features, direct_features(cell_table, backbone, resize), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16", "convnext_tiny"])
def test_timm_weight_files_give_timm_features(tmp_path, name, suffix):
    model = timm_model(name, seed=4)
    path = tmp_path / f"weights{suffix}"
    state = {key: value.contiguous() for key, value in model.state_dict().items()}  # head included
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    x = torch.rand(2, 3, 64, 48)
    backbone = build_backbone(name, in_channels=3, weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), timm_features(model, x), rtol=1e-5, atol=1e-5)
    # One input channel: a grey image gives what timm's model gives for it repeated 3 times.
    grey = torch.rand(2, 1, 64, 64)
    single = build_backbone(name, in_channels=1, weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(single(grey), timm_features(model, grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    differing = {k for k, v in backbone.state_dict().items() if not torch.equal(single.state_dict()[k], v)}
    assert differing == {"stem.0.weight" if name == "convnext_tiny" else "patch_embed.proj.weight"}


def test_dino_style_checkpoints_load_the_teacher_or_the_student(tmp_path):
    teacher, student = timm_model("vit_small_patch16", seed=1), timm_model("vit_small_patch16", seed=2)
    head = {"head.mlp.0.weight": torch.rand(8, 384), "head.last_layer.weight_g": torch.ones(16, 1)}
    full = {
        # DINO's main_dino.py saves the student under DistributedDataParallel ("module.") and
        # both as MultiCropWrapper(backbone, head); its arguments as an argparse namespace.
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items() if not k.startswith("head")}
        | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items() if not k.startswith("head")} | head,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    torch.save({"student": full["student"]}, tmp_path / "student_only.pth")
    x = torch.rand(2, 3, 64, 64)
    for file, network in (("checkpoint.pth", teacher), ("student_only.pth", student)):
        backbone = build_backbone("vit_small_patch16", in_channels=3, weights=tmp_path / file).eval()
        with torch.no_grad():
            torch.testing.assert_close(backbone(x), timm_features(network, x), rtol=1e-5, atol=1e-5)


def test_position_embeddings_of_another_grid_are_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    big = timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=0)  # 24 x 24 patches
    torch.save(big.state_dict(), tmp_path / "vit384.pth")
    backbone = build_backbone("vit_tiny_patch16", in_channels=3, weights=tmp_path / "vit384.pth")
    expected = resample_abs_pos_embed(big.pos_embed.detach(), new_size=[14, 14], num_prefix_tokens=1)
    torch.testing.assert_close(backbone.pos_embed.detach(), expected)
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)


def test_weights_of_another_architecture_are_refused_by_name(tmp_path):
    torch.save(timm_model("vit_small_patch16").state_dict(), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"small\.pth does not fit backbone vit_tiny_patch16.*shape mismatches"):
        build_backbone("vit_tiny_patch16", in_channels=3, weights=tmp_path / "small.pth")


def test_vit_pooling_options():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 48)
    pooled = {pool: build_backbone("vit_tiny_patch8", pool=pool).eval() for pool in (None, "cls", "mean", "cls+mean")}
    weights = pooled[None].state_dict()
    for backbone in pooled.values():
        backbone.load_state_dict(weights)
    with torch.no_grad():
        tokens = pooled[None].forward_tokens(x)  # (2, 1 + 4 x 6, 192)
        out = {pool: backbone(x) for pool, backbone in pooled.items()}
    assert tokens.shape == (2, 25, 192)
    torch.testing.assert_close(out[None], tokens[:, 0])
    torch.testing.assert_close(out["cls"], tokens[:, 0])
    torch.testing.assert_close(out["mean"], tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(out["cls+mean"], torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1))
    assert pooled["cls+mean"].feature_dim == 384
    with pytest.raises(ValueError, match="pool"):
        build_backbone("convnext_tiny", pool="mean")
    with pytest.raises(ValueError, match="ViT backbones only"):
        build_backbone("resnet18", pool="cls")


def test_input_checks_name_the_patch_size():
    backbone = build_backbone("vit_tiny_patch16", in_channels=1)
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        backbone(torch.rand(2, 1, 40, 48))
    with pytest.raises(ValueError, match=">= 16 px"):
        backbone(torch.rand(2, 1, 8, 16))
    with pytest.raises(ValueError, match=">= 32 px"):
        build_backbone("convnext_tiny")(torch.rand(2, 1, 16, 64))


def test_inference_copy_and_ema_copies_are_independent_networks():
    backbone = build_backbone("vit_tiny_patch16", in_channels=1)
    x = torch.rand(2, 1, 32, 32)
    inference = InferenceBackbone(backbone)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), backbone.eval()(x))
    byol = build_method("byol", backbone, projection_dim=8, hidden_dim=8)
    copied = copy.deepcopy(backbone)
    assert {id(p) for p in byol.target_backbone.parameters()}.isdisjoint(id(p) for p in backbone.parameters())
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.5)
        moved = backbone(x)
    with torch.no_grad():  # the copies' forward passes read their own parameters
        assert not torch.allclose(byol.target_backbone.eval()(x), moved)
        assert not torch.allclose(copied.eval()(x), moved)
        assert not torch.allclose(inference(x), moved)
