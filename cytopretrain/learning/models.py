"""Backbones: torchvision classification networks cut to a global-average-pooled encoder.

``build_backbone(name, in_channels=..., weights=...)`` returns a :class:`Backbone`, the
torchvision network of that name without its pooling and classification head:

- ``forward(x)``: (B, C, H, W) float -> (B, D) global-average-pooled features;
- ``forward_maps(x)``: (B, C, H, W) -> (B, D, h, w), the last feature map (stride 32:
  h = ceil(H / 32) for the ResNets and EfficientNet-B0, about H / 32 for DenseNet-121);
- D (``feature_dim``): efficientnet_b0 1280, resnet18 512, resnet50 2048, densenet121 1024.

Any input size from ``min_input_size`` up works (feature extraction at native resolution):
16 px for the ResNets and EfficientNet-B0, 32 px for DenseNet-121, whose unpadded 2x2
average pools in the transition layers need at least 29 px.

The trunk modules keep torchvision's attribute names, so a Backbone's state dict is exactly
torchvision's state dict minus the head (``fc.*`` for ResNets, ``classifier.*`` otherwise).
Weights are never downloaded: ``weights`` is a local file, either a torchvision ImageNet file,
a file saved by :func:`save_backbone`, or either of these wrapped in a dict under
``"state_dict"`` or ``"model"``; a pretext method's state dict (keys ``backbone.*``, e.g. a
training checkpoint) gives its encoder.

First convolution for ``in_channels`` != 3 (the rest of the network is unchanged):

- random init: a fresh convolution of the same geometry with ``in_channels`` inputs,
  initialised as torchvision initialises that network's convolutions;
- from a weights file whose first kernel has ``c`` input channels (3 for ImageNet), each of
  the ``in_channels`` new kernels is the mean of the ``c`` file kernels scaled by
  ``c / in_channels``. A grey image repeated over ``in_channels`` channels then gives exactly
  the activations that the file's network gives for the grey image repeated over its ``c``
  channels (the convolution is linear in its input channels).

Inputs are used as given: ImageNet weights were trained on inputs normalised by the ImageNet
mean and standard deviation, which the caller applies if it wants them.
"""

from __future__ import annotations

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

BACKBONES = ("efficientnet_b0", "resnet18", "resnet50", "densenet121")

_FIRST_CONV = {
    "efficientnet_b0": "features.0.0",
    "resnet18": "conv1",
    "resnet50": "conv1",
    "densenet121": "features.conv0",
}
_HEAD_MODULES = {"efficientnet_b0": "classifier", "resnet18": "fc", "resnet50": "fc", "densenet121": "classifier"}
# torchvision's own init of these networks' convolutions (kaiming normal, ReLU gain).
_CONV_INIT_MODE = {"efficientnet_b0": "fan_out", "resnet18": "fan_out", "resnet50": "fan_out", "densenet121": "fan_in"}
_MIN_INPUT_SIZE = {"efficientnet_b0": 16, "resnet18": 16, "resnet50": 16, "densenet121": 32}
# Old torchvision DenseNet files name the layers of a dense layer "norm.1" instead of "norm1";
# torchvision's own loader renames them the same way.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


_METHOD_PREFIX = "backbone."


class Backbone(nn.Module):
    """A torchvision network without pooling and head: (B, C, H, W) -> (B, D) pooled features.

    Attributes: ``name`` (one of BACKBONES), ``in_channels`` (C), ``feature_dim`` (D),
    ``min_input_size`` (smallest H and W accepted).
    """

    def __init__(self, name: str, in_channels: int = 1) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
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


def _check_input(backbone: Backbone | InferenceBackbone, x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != backbone.in_channels:
        raise ValueError(f"{backbone.name} expects (B, {backbone.in_channels}, H, W) input, got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < backbone.min_input_size:
        raise ValueError(f"{backbone.name} needs H and W >= {backbone.min_input_size} px, got {tuple(x.shape[2:])}")


class InferenceBackbone(nn.Module):
    """An eval-mode copy of a Backbone for inference, (B, C, H, W) -> (B, D), with every
    BatchNorm whose input is a convolution's output alone folded into that convolution:
    W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps) per output channel.

    The pairs are found in the data flow traced by torch.fx (torch's ``fuse``). The features
    are those of the backbone in eval mode up to float rounding (about 1e-6 relative in
    fp32). A folded BatchNorm is one pass less over each activation map (benchmarks/README.md,
    "bench_features", has the measured gain). DenseNet-121 keeps its
    pre-activation BatchNorms, which follow a concatenation, not a convolution. The source
    backbone is not changed; its attributes name, in_channels, feature_dim and
    min_input_size are carried over.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.name = backbone.name
        self.in_channels = backbone.in_channels
        self.feature_dim = backbone.feature_dim
        self.min_input_size = backbone.min_input_size
        self._final_relu = backbone._final_relu
        trunk = nn.Sequential(*(getattr(backbone, name) for name in backbone._trunk))
        self.trunk = fuse(copy.deepcopy(trunk).eval(), inplace=True)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x)
        maps = self.trunk(x)
        return (torch.relu(maps) if self._final_relu else maps).mean(dim=(2, 3))


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


def build_backbone(name: str, *, in_channels: int = 1, weights: str | os.PathLike | None = None) -> Backbone:
    """A Backbone with random (torchvision) init, or with the weights of a local file."""
    backbone = Backbone(name, in_channels)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file (unwrapped from "state_dict" / "model" if so wrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise WeightsError(f"weights file {path} is not a readable state dict: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if not isinstance(content, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise WeightsError(f"weights file {path} does not hold a state dict of named tensors")
    if any(key.startswith(_METHOD_PREFIX) for key in content):
        # A pretext method's state dict (training checkpoint): its encoder is "backbone.*";
        # heads, decoders and BYOL's target are not part of the backbone.
        return {key[len(_METHOD_PREFIX) :]: value for key, value in content.items() if key.startswith(_METHOD_PREFIX)}
    return dict(content)


def load_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load a weights file into ``backbone`` (see the module docstring for accepted files).

    Head keys of the file (``fc.*`` / ``classifier.*``) are ignored; BatchNorm
    ``num_batches_tracked`` counters may be absent (old torchvision files). Any other missing,
    unexpected or mis-shaped key raises WeightsError naming the file.
    """
    state = read_state_dict(path)
    if backbone.name == "densenet121":
        state = {_LEGACY_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    head = _HEAD_MODULES[backbone.name] + "."
    state = {key: value for key, value in state.items() if not key.startswith(head)}
    first = _FIRST_CONV[backbone.name] + ".weight"
    if first in state and state[first].ndim == 4:
        state[first] = adapt_first_conv_weight(state[first], backbone.in_channels)
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


def load_backbone(path: str | os.PathLike, name: str, in_channels: int = 1) -> Backbone:
    """A Backbone of ``name`` with the weights saved at ``path`` (weights-only loading)."""
    return build_backbone(name, in_channels=in_channels, weights=path)
