"""Refining a patch-grid partition with one multi-label DenseCRF (stage 1, post-processing).

The clustering step gives, per merge threshold, a partition of the patch grid.
Its region boundaries are blocky (one patch = 8 px at 480 px input), so every
region is snapped to the image's colour edges by a fully connected CRF over
all regions at once, and a region the CRF changes a lot (IoU of its mask
before and after below ``min_iou``) is taken as unreliable and dropped.

All masks here live on the resized image the backbone saw (S_h x S_w pixels,
480 x 480 by default); :mod:`hassod.discover.masks` maps them back to the
original image size.

pydensecrf is single-threaded: across images, run processes. ``CRFSettings.work_size``
runs it on a downscaled image (its cost and recall: docs/benchmarks.md, "DenseCRF").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf

from ..images import resize_image
from .masks import bilinear_taps


@dataclass(frozen=True)
class CRFSettings:
    """DenseCRF parameters; the defaults are HASSOD's (taken over from CutLER's MaskCut).

    Attributes:
        gaussian_sxy: spatial standard deviation of the smoothness kernel, in pixels
            of the resized image.
        gaussian_compat: weight of the smoothness kernel (Potts compatibility).
        bilateral_sxy: spatial standard deviation of the appearance kernel, pixels.
        bilateral_srgb: colour standard deviation of the appearance kernel, in
            uint8 intensity units.
        bilateral_compat: weight of the appearance kernel (Potts compatibility).
        iterations: mean-field iterations.
        min_iou: a region is kept when IoU(mask before CRF, mask after CRF) >= this.
        prob_clip: probabilities of the upsampled one-hot are clipped to at least
            this before ``-log``, so the unary stays finite (pydensecrf's default).
        work_size: ``None`` runs the CRF at the full resized size, the
            reference behaviour (slower: docs/benchmarks.md, "DenseCRF"). An
            integer runs the whole step (unary, CRF, IoU filter, returned masks)
            on the image downscaled so its longer side is this many pixels,
            spatial sigmas scaled to match: the CRF's cost is linear in pixels
            times regions, and the masks are resized to the original image afterwards anyway.
    """

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    min_iou: float = 0.5
    prob_clip: float = 1e-5
    # 160 px: the pseudo-labels' recall of the full 480 px reference at a fraction
    # of the time (docs/benchmarks.md, "DenseCRF"); the masks are resized to the
    # original image afterwards anyway.
    work_size: int | None = 160


@dataclass(frozen=True)
class CRFResult:
    """Regions of one partition that survived the CRF.

    Attributes:
        masks: (K_kept, s_h, s_w) bool, post-CRF masks at the working size (the
            resized image's size unless ``work_size`` is set); they do not
            overlap (they come from one label map).
        label_ids: (K_kept,) int64, the partition label of each kept mask, in
            increasing order.
        ious: (K_kept,) float32, IoU between each kept region's pre- and post-CRF mask.
    """

    masks: np.ndarray
    label_ids: np.ndarray
    ious: np.ndarray


def refine_partition(image: np.ndarray, labels: np.ndarray, settings: CRFSettings | None = None) -> CRFResult:
    """Run one multi-label DenseCRF over all regions of a partition and keep the stable ones.

    Args:
        image: (S_h, S_w, 3) uint8 RGB, the resized image the patch grid was computed on.
        labels: (h, w) integer region ids on the patch grid; any set of values
            (they need not be contiguous), each value is one region.
        settings: CRF parameters, :class:`CRFSettings` defaults when ``None``.

    The unary of region k at a pixel is ``-log p_k`` with ``p`` the bilinearly
    upsampled one-hot of ``labels`` (align_corners=False, as the reference
    implementation), clipped to ``settings.prob_clip``. The pre-CRF mask of a
    region is the argmax of that same upsampled one-hot (ties go to the lower
    label), the post-CRF mask the argmax of the CRF's marginals.

    Returns:
        :class:`CRFResult` with the post-CRF masks of the kept regions, at the
        working size (pixels, not patches).
    """
    settings = settings or CRFSettings()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be (h, w), got shape {labels.shape}")
    label_ids, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    num = len(label_ids)
    full_side = max(image.shape[:2])
    if settings.work_size is not None and settings.work_size < full_side:
        scale = settings.work_size / full_side
        image = resize_image(image, (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))))
    else:
        scale = 1.0
    size = (int(image.shape[0]), int(image.shape[1]))

    one_hot = _upsampled_one_hot(dense, size)
    pre = _upsampled_argmax(*one_hot, num)
    # A single region covers the image: the CRF has nothing to decide.
    post = pre if num == 1 else _crf_labels(image, one_hot, num, scale, settings)

    ious = _region_ious(pre, post, num)
    keep = np.flatnonzero(ious >= settings.min_iou)
    masks = (post[None, :] == keep[:, None]).reshape(len(keep), *size)
    return CRFResult(masks=masks, label_ids=label_ids[keep].astype(np.int64), ious=ious[keep])


def _upsampled_one_hot(dense: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sparse form of the bilinear upsampling (align_corners=False) of the one-hot of ``dense``.

    Bilinear interpolation reads 4 grid cells per output pixel, so the
    upsampled one-hot has at most 4 non-zero labels per pixel; building only
    those avoids a dense (K, S_h, S_w) interpolation, which costs more than
    everything else here but the CRF itself at large K.

    Returns:
        (labels, probs), both (4, S_h * S_w): the label of each of the 4 cells
        read, and the total probability of that label at the pixel (a label
        read twice has its weights summed, and appears twice with that sum).
    """
    (rows0, rows1, wy), (cols0, cols1, wx) = (
        bilinear_taps(n_in, n_out) for n_in, n_out in zip(dense.shape, size)
    )
    labels = np.stack([
        dense[np.ix_(rows, cols)].reshape(-1)
        for rows in (rows0, rows1) for cols in (cols0, cols1)
    ])
    weights = np.stack([
        np.outer(wr, wc).reshape(-1) for wr in (1.0 - wy, wy) for wc in (1.0 - wx, wx)
    ])
    same = labels[:, None, :] == labels[None, :, :]
    probs = (same * weights[None, :, :]).sum(axis=1).astype(np.float32)
    return labels, probs


def _upsampled_argmax(labels: np.ndarray, probs: np.ndarray, num: int) -> np.ndarray:
    """(S_h * S_w,) argmax label of the sparse upsampled one-hot; ties go to the lower label."""
    best = probs.max(axis=0)
    return np.where(probs == best, labels, num).min(axis=0)


def _unary(labels: np.ndarray, probs: np.ndarray, num: int, clip: float) -> np.ndarray:
    """(num, N) C-contiguous float32 ``-log(max(p, clip))`` from the sparse upsampled one-hot."""
    unary = np.full((num, labels.shape[1]), -np.log(clip), dtype=np.float32)
    pixels = np.broadcast_to(np.arange(labels.shape[1]), labels.shape)
    # A label read twice at a pixel is written twice with the same value.
    unary[labels, pixels] = -np.log(np.maximum(probs, clip))
    return unary


def _crf_labels(
    image: np.ndarray, one_hot: tuple[np.ndarray, np.ndarray], num: int, scale: float, settings: CRFSettings
) -> np.ndarray:
    """(s_h * s_w,) argmax of the DenseCRF marginals; ``scale`` = work size / resized size."""
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, num)
    # pydensecrf reads raw buffers: it needs a C-contiguous float32 (K, N)
    # unary and a writable C-contiguous uint8 (H, W, 3) image (it refuses
    # read-only arrays, such as PIL-backed ones).
    crf.setUnaryEnergy(_unary(*one_hot, num, settings.prob_clip))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy * scale, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=settings.bilateral_sxy * scale,
        srgb=settings.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C"),
        compat=settings.bilateral_compat,
    )
    # The marginals come back as a column-major (K, N) Eigen matrix: argmax
    # over its rows needs no copy.
    return np.asarray(crf.inference(settings.iterations)).argmax(axis=0)


def _region_ious(pre: np.ndarray, post: np.ndarray, num: int) -> np.ndarray:
    """(num,) float32 IoU of each label between two flat label maps, from one confusion matrix."""
    pairs = pre.astype(np.int64) * num + post
    confusion = np.bincount(pairs, minlength=num * num).reshape(num, num)
    inter = np.diagonal(confusion)
    union = confusion.sum(axis=1) + confusion.sum(axis=0) - inter
    return (inter / np.maximum(union, 1)).astype(np.float32)
