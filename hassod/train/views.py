"""The student's strong view in Mean Teacher: photometric changes only (docs/design.md §6).

:func:`strong_view` takes an image tensor (3, H, W) float32 in [0, 1] and
returns one of the same shape and range: colour jitter, grayscale, Gaussian
blur and random erasing, each drawn from the generator it is given (a pure
function of the item's key, so a resumed run sees the same pixels). No pixel
moves, so boxes and masks of the weak view hold for the strong one unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Erasing:
    """One random erasing: with chance ``p`` a rectangle of ``scale`` (share of the image area)
    and aspect ratio (h/w) in ``ratio``, log-uniform, filled with uniform random values."""

    p: float
    scale: tuple[float, float]
    ratio: tuple[float, float]


@dataclass(frozen=True)
class StrongAugmentation:
    """The reference's strong view (Unbiased-Teacher style), as stated in docs/design.md §6.

    jitter: ColorJitter's (brightness, contrast, saturation, hue) ranges, applied
    with chance ``jitter_p`` in a random order. grayscale_p: chance of
    grayscale. blur_p, blur_sigma: chance and range of a Gaussian blur's
    standard deviation (pixels). erasings: applied in order, each on its own chance.
    """

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    erasings: tuple[Erasing, ...] = (
        Erasing(0.7, (0.05, 0.2), (0.3, 3.3)),
        Erasing(0.5, (0.02, 0.2), (0.1, 6.0)),
        Erasing(0.3, (0.02, 0.2), (0.05, 8.0)),
    )


def strong_view(image: torch.Tensor, rng: np.random.Generator, aug: StrongAugmentation) -> torch.Tensor:
    """(3, H, W) float in [0, 1] → its strong view, same shape and range; ``image`` is not modified."""
    if rng.random() < aug.jitter_p:
        image = color_jitter(image, rng, aug.jitter)
    if rng.random() < aug.grayscale_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < aug.blur_p:
        sigma = float(rng.uniform(*aug.blur_sigma))
        image = TF.gaussian_blur(image, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    for erasing in aug.erasings:
        if rng.random() < erasing.p:
            image = random_erase(image, rng, erasing)
    return image


def color_jitter(image: torch.Tensor, rng: np.random.Generator, ranges: tuple[float, float, float, float]
                 ) -> torch.Tensor:
    """Brightness, contrast, saturation (factors in 1 ± r) and hue (shift in ± r) in a random order."""
    brightness, contrast, saturation, hue = ranges
    adjust = (
        lambda img: TF.adjust_brightness(img, float(rng.uniform(1 - brightness, 1 + brightness))),
        lambda img: TF.adjust_contrast(img, float(rng.uniform(1 - contrast, 1 + contrast))),
        lambda img: TF.adjust_saturation(img, float(rng.uniform(1 - saturation, 1 + saturation))),
        lambda img: TF.adjust_hue(img, float(rng.uniform(-hue, hue))),
    )
    for index in rng.permutation(len(adjust)):
        image = adjust[index](image)
    return image


def random_erase(image: torch.Tensor, rng: np.random.Generator, erasing: Erasing) -> torch.Tensor:
    """Fill one random rectangle with uniform noise; ten tries to fit one inside the image, else unchanged."""
    _, height, width = image.shape
    log_ratio = (math.log(erasing.ratio[0]), math.log(erasing.ratio[1]))
    for _ in range(10):
        area = height * width * rng.uniform(*erasing.scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            noise = torch.from_numpy(rng.random((3, h, w), dtype=np.float32)).to(image.dtype)
            return TF.erase(image, top, left, h, w, noise)
    return image
