"""Backbones: torchvision and timm networks cut to an encoder of pooled features.

``build_backbone(name, in_channels=..., weights=..., pool=...)`` returns a :class:`Backbone`,
the contract every pretext method, feature extraction and the evaluations use:

- ``forward(x)``: (B, C, H, W) float -> (B, D) pooled features;
- attributes ``name``, ``in_channels`` (C), ``feature_dim`` (D), ``min_input_size`` (smallest H
  and W accepted) and ``input_multiple`` (H and W must be multiples of it: a ViT's patch size,
  1 for the convolutional networks).

Torchvision networks (TORCHVISION_BACKBONES, :class:`TorchvisionBackbone`): the network
without its pooling and classification head, global-average-pooled; ``forward_maps(x)`` gives
the last feature map (B, D, h, w) (stride 32: h = ceil(H / 32) for the ResNets and
EfficientNet-B0, about H / 32 for DenseNet-121). D: efficientnet_b0 1280, resnet18 512,
resnet50 2048, densenet121 1024. Any input size from ``min_input_size`` up works (feature
extraction at native resolution): 16 px for the ResNets and EfficientNet-B0, 32 px for
DenseNet-121, whose unpadded 2x2 average pools in the transition layers need at least 29 px.
The trunk modules keep torchvision's attribute names, so the state dict is exactly
torchvision's minus the head (``fc.*`` for ResNets, ``classifier.*`` otherwise).

timm networks (TIMM_BACKBONES, :class:`TimmBackbone`, timm pinned in requirements.txt):
``timm.create_model(<timm name>, in_chans=C, num_classes=0)``, whose modules and parameters
are the backbone's own, so the state dict is exactly timm's (without the classifier).

- Vision Transformers (vit_tiny_patch16 and vit_tiny_patch8 D 192, vit_small_patch16 and
  vit_small_patch8 D 384, vit_base_patch16 D 768): built for 224 px with ``dynamic_img_size``: any H and W that the
  patch size divides, the position embeddings of the 224 px grid interpolated (bicubic, timm)
  to the input's grid at every call, as DINO does for its local crops. ``min_input_size`` and
  ``input_multiple`` are the patch size. The feature (``pool``) is the CLS token after the
  final LayerNorm (None or "cls", DINO's and timm's choice), "mean" the mean of the patch
  tokens after that LayerNorm, or "cls+mean" both concatenated (D doubles).
- convnext_tiny (D 768): timm's own head up to the logits: global average pool and its
  LayerNorm. At least 32 px (stem 4 and three 2x downsamplings).

Weights are never downloaded: ``weights`` is a local file (see :func:`read_state_dict` for the
formats: torch files, ``.safetensors``, wrapped dicts, DINO-style checkpoints, pretext-method
checkpoints). A pretext method's state dict (keys ``backbone.*``, e.g. a training
checkpoint) gives its encoder. Classifier keys of the file are ignored.

First layer for ``in_channels`` != 3 (the rest of the network is unchanged): the first
convolution of a torchvision network, the patch embedding of a ViT, the stem convolution of
ConvNeXt.

- random init: a fresh layer of the same geometry with ``in_channels`` inputs, initialised
  as the library initialises it (torchvision: its kaiming normal; timm: its own init);
- from a weights file whose first kernel has ``c`` input channels (3 for ImageNet), each of
  the ``in_channels`` new kernels is the mean of the ``c`` file kernels scaled by
  ``c / in_channels``. A grey image repeated over ``in_channels`` channels then gives exactly
  the activations that the file's network gives for the grey image repeated over its ``c``
  channels (the layer is linear in its input channels).

A ViT file whose position embeddings belong to another grid (e.g. a 384 px model) has them
resampled to the 224 px grid (timm's ``resample_abs_pos_embed``) when loaded.

Inputs are used as given: ImageNet weights were trained on inputs normalised by the ImageNet
mean and standard deviation, which the caller applies if it wants them.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from cytopretrain.core.errors import WeightsError
from cytopretrain.core.tables import atomic_path

TORCHVISION_BACKBONES = ("efficientnet_b0", "resnet18", "resnet50", "densenet121")
# Our name -> timm's model name and options (224 px variants: their position-embedding grid is
# the reference). ViT-tiny/8 is timm's ViT-tiny with 8 px patches, for cells of 32-64 px.
TIMM_BACKBONES = {
    "vit_tiny_patch16": ("vit_tiny_patch16_224", {}),
    "vit_tiny_patch8": ("vit_tiny_patch16_224", {"patch_size": 8}),
    "vit_small_patch16": ("vit_small_patch16_224", {}),
    "vit_small_patch8": ("vit_small_patch8_224", {}),
    "vit_base_patch16": ("vit_base_patch16_224", {}),
    "convnext_tiny": ("convnext_tiny", {}),
}
BACKBONES = (*TORCHVISION_BACKBONES, *TIMM_BACKBONES)
# Feature of a ViT: None (the backbone's own: the CLS token) | cls | mean (patch tokens) | cls+mean.
POOLS = (None, "cls", "mean", "cls+mean")

_FIRST_CONV = {
    "efficientnet_b0": "features.0.0",
    "resnet18": "conv1",
    "resnet50": "conv1",
    "densenet121": "features.conv0",
}
_HEAD_MODULES = {"efficientnet_b0": "classifier", "resnet18": "fc", "resnet50": "fc", "densenet121": "classifier"}
# torchvision's own init of these networks' convolutions (kaiming normal, ReLU gain).
_CONV_INIT_MODE = {"efficientnet_b0": "fan_out", "resnet18": "fan_out", "resnet50": "fan_out", "densenet121": "fan_in"}
_MIN_INPUT_SIZE = {"efficientnet_b0": 16, "resnet18": 16, "resnet50": 16, "densenet121": 32, "convnext_tiny": 32}
# Old torchvision DenseNet files name the layers of a dense layer "norm.1" instead of "norm1";
# torchvision's own loader renames them the same way.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
# The first layer of the timm networks (its weight takes the in_channels adaptation).
_TIMM_FIRST_LAYER = {"vit": "patch_embed.proj.weight", "convnext": "stem.0.weight"}


_METHOD_PREFIX = "backbone."
_DDP_PREFIX = "module."


class Backbone(nn.Module):
    """The encoder contract: (B, C, H, W) -> (B, D) pooled features (see the module docstring).

    Attributes: ``name`` (one of BACKBONES), ``in_channels`` (C), ``feature_dim`` (D),
    ``min_input_size`` (smallest H and W), ``input_multiple`` (H and W must be multiples of it),
    ``pool`` (a ViT's feature, POOLS).
    """

    name: str
    in_channels: int
    feature_dim: int
    min_input_size: int
    input_multiple: int = 1
    pool: str | None = None

    def inference_model(self) -> nn.Module:
        """An eval-mode module of its own weights computing ``forward`` (see InferenceBackbone)."""
        raise NotImplementedError

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A weights file's tensors renamed and reshaped to fit this backbone (classifier keys
        dropped, first layer adapted to ``in_channels``)."""
        raise NotImplementedError


def _check_name_and_channels(name: str, in_channels: int, family: tuple | dict) -> None:
    if name not in family:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")


class TorchvisionBackbone(Backbone):
    """A torchvision network without pooling and head: (B, C, H, W) -> (B, D) pooled features."""

    def __init__(self, name: str, in_channels: int = 1) -> None:
        super().__init__()
        _check_name_and_channels(name, in_channels, TORCHVISION_BACKBONES)
        self.name = name
        self.in_channels = in_channels
        self.min_input_size = _MIN_INPUT_SIZE[name]
        network = getattr(torchvision.models, name)(weights=None)
        self.feature_dim = _head_in_features(network, name)
        self._trunk: list[str] = []
        for child_name, module in network.named_children():
            if child_name not in (_HEAD_MODULES[name], "avgpool"):
                self.add_module(child_name, module)
                self._trunk.append(child_name)
        # torchvision's DenseNet applies this ReLU in forward(), after its feature stack.
        self._final_relu = name == "densenet121"
        if in_channels != 3:
            self._set_first_conv_weight(_fresh_first_conv_weight(self.first_conv, in_channels, name))

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.get_submodule(_FIRST_CONV[self.name])

    def forward_maps(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> last feature map (B, D, h, w)."""
        _check_input(self, x)
        for child_name in self._trunk:
            x = getattr(self, child_name)(x)
        return torch.relu(x) if self._final_relu else x

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) global-average-pooled features."""
        return self.forward_maps(x).mean(dim=(2, 3))

    def inference_model(self) -> nn.Module:
        trunk = nn.Sequential(*(getattr(self, name) for name in self._trunk))
        return _PooledTrunk(fuse(copy.deepcopy(trunk).eval(), inplace=True), self._final_relu)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.name == "densenet121":
            state = {_LEGACY_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}
        head = _HEAD_MODULES[self.name] + "."
        state = {key: value for key, value in state.items() if not key.startswith(head)}
        return _adapt_first_layer(state, _FIRST_CONV[self.name] + ".weight", self.in_channels)

    def _set_first_conv_weight(self, weight: Tensor) -> None:
        old = self.first_conv
        conv = nn.Conv2d(
            weight.shape[1],
            old.out_channels,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=old.groups,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if old.bias is not None:
                conv.bias.copy_(old.bias)
        parent_path, _, attribute = _FIRST_CONV[self.name].rpartition(".")
        setattr(self.get_submodule(parent_path) if parent_path else self, attribute, conv)


class _PooledTrunk(nn.Module):
    """A (folded) torchvision trunk followed by the global average pool."""

    def __init__(self, trunk: nn.Module, final_relu: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self._final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        maps = self.trunk(x)
        return (torch.relu(maps) if self._final_relu else maps).mean(dim=(2, 3))


class TimmBackbone(Backbone):
    """A timm network (TIMM_BACKBONES) without its classifier: (B, C, H, W) -> (B, D).

    The timm model's child modules and top-level parameters (a ViT's ``cls_token`` and
    ``pos_embed``) are registered as this module's own, so state-dict keys are timm's and a
    timm weights file loads as it is. The timm model object itself is kept outside the
    module tree (``_timm``) and only used for its forward functions, which read those same
    modules and parameters; deep copies (BYOL's and DINO's EMA networks) copy it with them.
    """

    def __init__(self, name: str, in_channels: int = 1, pool: str | None = None) -> None:
        super().__init__()
        import timm  # imported on use: the workflow's config check need not load it

        _check_name_and_channels(name, in_channels, TIMM_BACKBONES)
        self.name = name
        self.in_channels = in_channels
        self.is_vit = name.startswith("vit_")
        if pool not in POOLS or (pool is not None and not self.is_vit):
            allowed = POOLS if self.is_vit else (None,)
            raise ValueError(f"pool must be one of {allowed} for backbone {name}, got {pool!r}")
        self.pool = pool
        timm_name, options = TIMM_BACKBONES[name]
        if self.is_vit:
            options = {**options, "dynamic_img_size": True}
        model = timm.create_model(timm_name, pretrained=False, in_chans=in_channels, num_classes=0, **options)
        object.__setattr__(self, "_timm", model)  # not a submodule: its parts are registered below
        for child_name, module in model.named_children():
            self.add_module(child_name, module)
        for parameter_name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(parameter_name, parameter)
        for buffer_name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer)
        self._classifier = model.pretrained_cfg["classifier"] + "."
        if self.is_vit:
            self.patch_size = model.patch_embed.patch_size[0]
            self.min_input_size = self.input_multiple = self.patch_size
            self.feature_dim = model.embed_dim * (2 if pool == "cls+mean" else 1)
        else:
            self.min_input_size = _MIN_INPUT_SIZE[name]
            self.feature_dim = model.num_features

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        self._timm.training = mode  # its children are ours and already switched
        return self

    def forward_tokens(self, x: Tensor) -> Tensor:
        """ViT: (B, C, H, W) -> (B, 1 + N, D) CLS and patch tokens after the final LayerNorm."""
        _check_input(self, x)
        return self._timm.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) features (see ``pool`` in the module docstring)."""
        if not self.is_vit:
            _check_input(self, x)
            return self._timm.forward_head(self._timm.forward_features(x), pre_logits=True)
        tokens = self.forward_tokens(x)
        cls = tokens[:, 0]
        if self.pool in (None, "cls"):
            return cls
        mean = tokens[:, self._timm.num_prefix_tokens :].mean(dim=1)
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=1)

    def inference_model(self) -> nn.Module:
        return copy.deepcopy(self).eval()  # no BatchNorm to fold (LayerNorm throughout)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {key: value for key, value in state.items() if not key.startswith(self._classifier)}
        first = _TIMM_FIRST_LAYER["vit" if self.is_vit else "convnext"]
        state = _adapt_first_layer(state, first, self.in_channels)
        if self.is_vit and "pos_embed" in state and state["pos_embed"].shape != self.pos_embed.shape:
            state["pos_embed"] = _resample_position_embedding(state["pos_embed"], self)
        return state


def _resample_position_embedding(pos_embed: Tensor, backbone: TimmBackbone) -> Tensor:
    """(1, prefix + g*g, D) of a square grid g -> this backbone's grid (bicubic, timm)."""
    from timm.layers import resample_abs_pos_embed

    prefix = backbone._timm.num_prefix_tokens
    grid = backbone._timm.patch_embed.grid_size
    old = round((pos_embed.shape[1] - prefix) ** 0.5)
    if old * old != pos_embed.shape[1] - prefix or pos_embed.shape[2] != backbone.pos_embed.shape[2]:
        return pos_embed  # not a square grid of this width: reported as a shape mismatch
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[old, old], num_prefix_tokens=prefix)


def _adapt_first_layer(state: dict[str, Tensor], key: str, in_channels: int) -> dict[str, Tensor]:
    if key in state and state[key].ndim == 4:
        state = {**state, key: adapt_first_conv_weight(state[key], in_channels)}
    return state


def _check_input(backbone: Backbone | InferenceBackbone, x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != backbone.in_channels:
        raise ValueError(f"{backbone.name} expects (B, {backbone.in_channels}, H, W) input, got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < backbone.min_input_size:
        raise ValueError(f"{backbone.name} needs H and W >= {backbone.min_input_size} px, got {tuple(x.shape[2:])}")
    multiple = backbone.input_multiple
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"{backbone.name} needs H and W that are multiples of its patch size {multiple}, got {tuple(x.shape[2:])}"
        )


class InferenceBackbone(nn.Module):
    """An eval-mode copy of a Backbone for inference, (B, C, H, W) -> (B, D).

    Torchvision networks: every BatchNorm whose input is a convolution's output alone is
    folded into that convolution: W' = W * s and b' = (b - mean) * s + beta, s = gamma /
    sqrt(var + eps) per output channel. The pairs are found in the data flow traced by
    torch.fx (torch's ``fuse``). The features are those of the backbone in eval mode up to
    float rounding (about 1e-6 relative in fp32). A folded BatchNorm is one pass less over each
    activation map (benchmarks/README.md, "bench_features", has the measured gain).
    DenseNet-121 keeps its pre-activation BatchNorms, which follow a concatenation, not a
    convolution. timm networks have no BatchNorm to fold (LayerNorm): an eval-mode copy.
    The source backbone is not changed; its attributes name, in_channels, feature_dim,
    min_input_size and input_multiple are carried over.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.name = backbone.name
        self.in_channels = backbone.in_channels
        self.feature_dim = backbone.feature_dim
        self.min_input_size = backbone.min_input_size
        self.input_multiple = backbone.input_multiple
        self.model = backbone.inference_model()
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x)
        return self.model(x)


def _head_in_features(network: nn.Module, name: str) -> int:
    head = getattr(network, _HEAD_MODULES[name])
    linear = head if isinstance(head, nn.Linear) else next(m for m in head if isinstance(m, nn.Linear))
    return linear.in_features


def _fresh_first_conv_weight(conv: nn.Conv2d, in_channels: int, name: str) -> Tensor:
    weight = torch.empty(conv.out_channels, in_channels, *conv.kernel_size)
    nn.init.kaiming_normal_(weight, mode=_CONV_INIT_MODE[name], nonlinearity="relu")
    return weight


def adapt_first_conv_weight(weight: Tensor, in_channels: int) -> Tensor:
    """(O, c, k, k) kernel -> (O, in_channels, k, k): mean over the c inputs, scaled by c / in_channels."""
    c = weight.shape[1]
    if c == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True) * (c / in_channels)
    return mean.expand(-1, in_channels, -1, -1).clone()


def build_backbone(
    name: str, *, in_channels: int = 1, weights: str | os.PathLike | None = None, pool: str | None = None
) -> Backbone:
    """A Backbone with random (library) init, or with the weights of a local file."""
    if name in TIMM_BACKBONES:
        backbone: Backbone = TimmBackbone(name, in_channels, pool)
    else:
        if pool is not None:
            raise ValueError(f"pool applies to the ViT backbones only, not to {name!r} (got {pool!r})")
        backbone = TorchvisionBackbone(name, in_channels)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The backbone tensors of a weights file.

    Accepted: a torch file (``torch.load`` with ``weights_only=True``; an ``args`` namespace
    as DINO's checkpoints hold is allowed) or a ``.safetensors`` file, holding a state dict,
    possibly wrapped under "state_dict" or "model", or a DINO-style checkpoint with
    "teacher" / "student" dicts (the teacher is taken: DINO evaluates it). Key prefixes
    ``module.`` (DistributedDataParallel) are removed; when keys start with ``backbone.``
    (a pretext method's or DINO's network: encoder plus heads), only those are kept, without
    the prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(path, device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise WeightsError(f"weights file {path} is not a readable state dict: {error}") from error
    for wrapper in ("state_dict", "model", "teacher", "student"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if not isinstance(content, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise WeightsError(f"weights file {path} does not hold a state dict of named tensors")
    content = {key.removeprefix(_DDP_PREFIX): value for key, value in content.items()}
    if any(key.startswith(_METHOD_PREFIX) for key in content):
        # A pretext method's state dict (training checkpoint) or DINO's student / teacher: the
        # encoder is "backbone.*"; heads, decoders and EMA networks are not part of it.
        return {key[len(_METHOD_PREFIX) :]: value for key, value in content.items() if key.startswith(_METHOD_PREFIX)}
    return dict(content)


def load_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load a weights file into ``backbone`` (see the module docstring for accepted files).

    Classifier keys of the file (``fc.*`` / ``classifier.*`` / timm's ``head``) are ignored;
    BatchNorm ``num_batches_tracked`` counters may be absent (old torchvision files). Any other
    missing, unexpected or mis-shaped key raises WeightsError naming the file.
    """
    state = backbone.adapt_state_dict(read_state_dict(path))
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in found.items()
        if keys
    ]
    if problems:
        raise WeightsError(
            f"weights file {path} does not fit backbone {backbone.name} "
            f"(in_channels={backbone.in_channels}): " + "; ".join(problems)
        )
    backbone.load_state_dict({**own, **state})


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> None:
    """Write the backbone's state dict (CPU tensors) atomically; readable by load_backbone."""
    state = {key: value.detach().cpu() for key, value in backbone.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_backbone(path: str | os.PathLike, name: str, in_channels: int = 1, pool: str | None = None) -> Backbone:
    """A Backbone of ``name`` with the weights saved at ``path`` (weights-only loading)."""
    return build_backbone(name, in_channels=in_channels, weights=path, pool=pool)
