"""Batched augmentations of fluorescence images, (B, C, H, W) float tensors in [0, 1].

Every function draws its randomness from an explicit ``torch.Generator`` (pass it by keyword
``generator=``; no global RNG), one independent draw per sample (and per channel where said),
so a run is reproducible and resumable from the generator's state. Random numbers are drawn
on the generator's device and moved to the images' device: a CPU generator works for CUDA
images too, a generator on the images' device avoids the copy.

Data-parallel ranks that each hold one equal part of a global batch run inside
``batch_part(index, count)``: every draw is then made for the whole global batch and the
rank keeps its part's slice, so the ranks, starting from the same generator state, apply
exactly the augmentations one process would apply to the whole batch.

These are the fluorescence versions of the seeds' augmentations (CytoImageNet: rotation
0-360 degrees; BYOL seed: ColorJitter, RandomGrayscale, horizontal flip, Gaussian blur,
solarization, RandomResizedCrop):

- geometry: any-angle rotation and vertical as well as horizontal flips, since a microscope
  field has no "up" (rotation plus flips cover all orientations and handedness);
- intensity: channels are separate stains, not colours, so hue, saturation and grey
  conversion have no meaning; their analogue is an independent gain (brightness), contrast
  and gamma per channel, as exposure and staining vary per channel;
- solarization is left out: inverting bright pixels has no physical counterpart in
  fluorescence, where intensity counts fluorophores;
- Gaussian noise stands in for camera (shot and read) noise.

All outputs stay in [0, 1]: resampling is bilinear (a convex combination) with constant
zero fill, and intensity changes and noise are clamped.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FILL_MODES = ("zeros", "border", "reflection")


def _check_batch(x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {x.dtype} of shape {tuple(x.shape)}")


_BATCH_PART: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("batch_part", default=(0, 1))


@contextlib.contextmanager
def batch_part(index: int, count: int) -> Iterator[None]:
    """Within the block, batches are part ``index`` of ``count`` equal parts of a global batch
    (see the module docstring)."""
    if not 0 <= index < count:
        raise ValueError(f"batch part {index} of {count} does not exist")
    token = _BATCH_PART.set((index, count))
    try:
        yield
    finally:
        _BATCH_PART.reset(token)


def draw(sample: Callable[[tuple[int, ...]], Tensor], shape: tuple[int, ...], batch_axis: int, device) -> Tensor:
    """``sample(shape)`` moved to ``device``; inside ``batch_part`` the draw is made for the
    global batch along ``batch_axis`` and this part's slice is returned."""
    index, count = _BATCH_PART.get()
    if count == 1:
        return sample(tuple(shape)).to(device)
    local = shape[batch_axis]
    full = (*shape[:batch_axis], local * count, *shape[batch_axis + 1 :])
    return sample(full).narrow(batch_axis, index * local, local).to(device)


def _rand(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, batch_axis: int = 0) -> Tensor:
    """Uniform [0, 1) float32 numbers from ``generator``, on ``device`` (batch along ``batch_axis``)."""
    return draw(lambda size: torch.rand(size, generator=generator, device=generator.device), shape, batch_axis, device)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, device) -> Tensor:
    """Uniform [low, high) numbers; the batch runs along the first axis of ``shape``."""
    return low + (high - low) * _rand(generator, shape, device)


def _range(name: str, value: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    """A (min, max) pair inside [low, high], else ValueError naming the argument."""
    a, b = (float(v) for v in value)
    if not (low <= a <= b and (high is None or b <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an ordered pair within {bound}, got {tuple(value)}")
    return a, b


def _probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


def rotate(x: Tensor, degrees: float | Tensor, *, fill: str = "zeros") -> Tensor:
    """Rotate each image about its centre by ``degrees`` (scalar or (B,)), counter-clockwise as
    displayed (row 0 at the top): 90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))`` for
    square images. Bilinear; pixels from outside the image are filled per ``fill``: "zeros"
    (default: the dark background of a fluorescence field, no invented structure),
    "border" (edge pixels repeated) or "reflection" (mirrored content).
    """
    _check_batch(x)
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
    batch, _, height, width = x.shape
    angles = torch.as_tensor(degrees, dtype=torch.float64, device=x.device).expand(batch)
    radians = angles * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # The grid maps each output pixel back to its source; normalized coordinates span the
    # image's extent on each axis, hence the aspect factors for non-square images.
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (height / width)
    theta[:, 1, 0] = sin * (width / height)
    theta[:, 1, 1] = cos
    return _resample(x, theta, (height, width), fill)


def _resample(x: Tensor, theta: Tensor, size: tuple[int, int], fill: str) -> Tensor:
    grid = F.affine_grid(theta.to(torch.float32), [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=fill, align_corners=False)
    return out.to(x.dtype)


def random_rotation(x: Tensor, generator: torch.Generator, *, fill: str = "zeros") -> Tensor:
    """Rotate each image by an angle drawn uniformly from [0, 360) degrees (see ``rotate``)."""
    _check_batch(x)
    return rotate(x, _uniform(generator, (x.shape[0],), 0.0, 360.0, x.device), fill=fill)


def random_flips(x: Tensor, generator: torch.Generator, *, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p`` and, independently, up-down with ``p``."""
    _check_batch(x)
    _probability("p", p)
    flips = _rand(generator, (2, x.shape[0]), x.device, batch_axis=1) < p
    x = torch.where(flips[0, :, None, None, None], x.flip(-1), x)
    return torch.where(flips[1, :, None, None, None], x.flip(-2), x)


def random_resized_crop(
    x: Tensor,
    size: int | tuple[int, int],
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator,
    attempts: int = 10,
) -> Tensor:
    """Crop a random box per image and resize it to ``size`` (bilinear, no antialiasing).

    As torchvision's RandomResizedCrop: the box covers a fraction of the image area drawn
    uniformly from ``scale``, with width/height ratio log-uniform in ``ratio``; of ``attempts``
    draws the first that fits is used, else the largest box of ratio within ``ratio``. Boxes
    lie at a uniformly random position inside the image, with sub-pixel position and size (the
    resampling grid needs no rounding).
    Returns (B, C, size_h, size_w).
    """
    _check_batch(x)
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    s_lo, s_hi = _range("scale", scale, 0.0, 1.0)
    if s_hi <= 0.0:
        raise ValueError(f"scale must allow a positive area, got {tuple(scale)}")
    r_lo, r_hi = _range("ratio", ratio, 0.0)
    if r_lo <= 0.0:
        raise ValueError(f"ratio must be positive, got {tuple(ratio)}")
    batch, _, height, width = x.shape
    draws = _rand(generator, (3, batch, attempts), x.device, batch_axis=1).double()
    area = height * width * (s_lo + (s_hi - s_lo) * draws[0])
    aspect = torch.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * draws[1])
    box_w, box_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (box_w <= width) & (box_h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting draw
    fallback_w, fallback_h = _whole_image_box(height, width, r_lo, r_hi)
    any_fit = fits.any(dim=1)
    box_w = torch.where(any_fit, box_w.gather(1, first)[:, 0], fallback_w)
    box_h = torch.where(any_fit, box_h.gather(1, first)[:, 0], fallback_h)
    position = _rand(generator, (2, batch), x.device, batch_axis=1).double()
    centre_x = box_w / 2 + position[0] * (width - box_w)
    centre_y = box_h / 2 + position[1] * (height - box_h)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = box_w / width
    theta[:, 0, 2] = 2 * centre_x / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = 2 * centre_y / height - 1
    return _resample(x, theta, (out_h, out_w), "zeros")


def _whole_image_box(height: int, width: int, r_lo: float, r_hi: float) -> tuple[float, float]:
    """The largest centred box of the image whose ratio lies in [r_lo, r_hi]."""
    aspect = width / height
    if aspect < r_lo:
        return float(width), width / r_lo
    if aspect > r_hi:
        return height * r_hi, float(height)
    return float(width), float(height)


def random_intensity(
    x: Tensor,
    generator: torch.Generator,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    gamma: Sequence[float] = (0.7, 1.4),
    p: float = 0.8,
) -> Tensor:
    """Per-channel intensity jitter, applied to each image with probability ``p``.

    For every image and channel independently: gain b ~ U[1 - brightness, 1 + brightness],
    contrast c ~ U[1 - contrast, 1 + contrast] about the channel's mean m, gamma g ~ U[gamma]:
    v = clamp(clamp((b x - b m) c + b m, 0, 1) ** g, 0, 1). The default strengths are the BYOL
    seed's ColorJitter brightness and contrast.
    """
    _check_batch(x)
    _probability("p", p)
    for name, value in (("brightness", brightness), ("contrast", contrast)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    g_lo, g_hi = _range("gamma", gamma, 1e-6)
    batch, channels = x.shape[:2]
    draws = _rand(generator, (4, batch, channels, 1, 1), x.device, batch_axis=1)
    gain = 1 + brightness * (2 * draws[0] - 1)
    stretch = 1 + contrast * (2 * draws[1] - 1)
    exponent = g_lo + (g_hi - g_lo) * draws[2]
    apply = draws[3, :, :1] < p  # one decision per image
    work = x.float() * gain
    mean = work.mean(dim=(2, 3), keepdim=True)
    work = ((work - mean) * stretch + mean).clamp(0.0, 1.0).pow(exponent)
    return torch.where(apply, work.clamp(0.0, 1.0), x.float()).to(x.dtype)


def gaussian_blur(
    x: Tensor, generator: torch.Generator, *, sigma: Sequence[float] = (0.1, 2.0), p: float = 0.5
) -> Tensor:
    """Blur each image with probability ``p``, sigma (pixels) ~ U[sigma], same for its channels.

    Separable Gaussian kernel of radius ceil(3 sigma_max) (at most the image side - 1),
    reflected borders; the kernel sums to 1, so a constant image is unchanged.
    """
    _check_batch(x)
    _probability("p", p)
    s_lo, s_hi = _range("sigma", sigma, 1e-6)
    batch, channels, height, width = x.shape
    radius = max(1, min(math.ceil(3 * s_hi), min(height, width) - 1))
    draws = _rand(generator, (2, batch), x.device, batch_axis=1)
    sigmas = s_lo + (s_hi - s_lo) * draws[0]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    # One grouped convolution per axis: every (image, channel) plane gets its own kernel.
    planes = F.pad(x.float().reshape(1, batch * channels, height, width), [radius] * 4, mode="reflect")
    planes = F.conv2d(planes, kernels[:, None, None, :], groups=batch * channels)
    planes = F.conv2d(planes, kernels[:, None, :, None], groups=batch * channels)
    blurred = planes.reshape(batch, channels, height, width).clamp(0.0, 1.0)
    return torch.where((draws[1] < p)[:, None, None, None], blurred, x.float()).to(x.dtype)


def gaussian_noise(x: Tensor, generator: torch.Generator, *, std: Sequence[float] = (0.0, 0.05)) -> Tensor:
    """Add zero-mean Gaussian noise, standard deviation ~ U[std] per image, then clamp to [0, 1]."""
    _check_batch(x)
    s_lo, s_hi = _range("std", std, 0.0)
    scale = _uniform(generator, (x.shape[0], 1, 1, 1), s_lo, s_hi, x.device)
    noise = draw(lambda size: torch.randn(size, generator=generator, device=generator.device), x.shape, 0, x.device)
    return (x.float() + scale * noise).clamp(0.0, 1.0).to(x.dtype)
