"""MM-GEM's PoolAggregator: how a ViT's patch-token feature map becomes one vector per image or region.

- Stage 1 (global): ``MeanPool(V)``, the mean over the H×W patch tokens of the feature map
  ``V ∈ ℝ^{B×C×H×W}``.
- Stage 2 (regional): ``mean_{bins} RoIAlign(V, R)``: torchvision's RoIAlign samples each box R
  (given in the model's input pixels) on an ``s×s`` grid of bins by bilinear interpolation of V,
  and the bins are averaged. A region is thus embedded from the full image's feature map, not
  from a crop.

Coordinates: a box is ``(x1, y1, x2, y2)`` in pixels of the image as the vision tower sees it
(after resize and crop; `boxes_to_input_frame` maps boxes from the original image). Patch (i, j)
of a ViT with patch size p covers pixels [j·p, (j+1)·p) × [i·p, (i+1)·p), so its feature sits
at the patch centre; with ``aligned=True`` RoIAlign maps pixel x to feature coordinate
``x/p − 0.5``, which puts feature (i, j) exactly at that centre. Consequence (tested): the box
of the whole image, with one bin per patch and one sample per bin, gives exactly the MeanPool.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from vla.errors import UserError


def mean_pool(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) → (B, C): the stage-1 PoolAggregator."""
    return feature_map.mean(dim=(2, 3))


class RoIPool(nn.Module):
    """The stage-2 PoolAggregator: RoIAlign over the feature map, then the mean over its bins.

    ``output_size`` bins per side and ``sampling_ratio`` bilinear samples per bin and side
    (torchvision's meaning; ≤ 0 means adaptive, ``ceil(roi_size / output_size)``).
    No parameters: it only changes how the frozen stage-1 features are read.
    """

    def __init__(self, patch_size: int, output_size: int = 4, sampling_ratio: int = 2) -> None:
        super().__init__()
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        self.patch_size = patch_size
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, feature_map: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """``boxes[b]`` (K_b, 4) are image b's boxes in input pixels → (ΣK_b, C), in image order."""
        if len(boxes) != feature_map.shape[0]:
            raise ValueError(f"{len(boxes)} box lists for {feature_map.shape[0]} images")
        # RoIAlign in fp32 whatever the model's precision: bilinear weights of box coordinates lose
        # whole pixels in bf16 (and torchvision's CPU kernel has no bf16); autocast off around it
        with torch.autocast(feature_map.device.type, enabled=False):
            bins = roi_align(
                feature_map.float(),
                [b.to(feature_map.device, torch.float32) for b in boxes],
                output_size=self.output_size,
                spatial_scale=1.0 / self.patch_size,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )  # (ΣK, C, s, s)
        return bins.mean(dim=(2, 3)).to(feature_map.dtype)


def check_boxes(boxes: Tensor, width: float, height: float, key: str) -> None:
    """Refuse a box that is empty, not finite, or outside its image — naming the sample."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise UserError(f"{key}: region boxes must be (K, 4) as x1, y1, x2, y2; got shape {tuple(boxes.shape)}")
    for box in boxes.tolist():
        x1, y1, x2, y2 = box
        if not all(map(_finite, box)):
            raise UserError(f"{key}: region box {box} is not finite; fix or drop the box")
        if not (x2 > x1 and y2 > y1):
            raise UserError(f"{key}: region box {box} is empty (need x2 > x1 and y2 > y1)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise UserError(f"{key}: region box {box} lies outside the {width:g}×{height:g} image")


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def resized_size(image_size: tuple[int, int], input_size: int, resize_mode: str = "shortest") -> tuple[int, int]:
    """(width, height) of the image after open_clip's resize, computed as the resize computes it:
    ``shortest`` = torchvision's ``Resize(input_size)``, which truncates the long side
    (``int(input_size · long / short)``: 640×480 → 298×224 at 224, not 299); ``longest`` = open_clip's
    ``ResizeKeepRatio(longest=1)``, which rounds each side; ``squash`` = both sides ``input_size``."""
    width, height = image_size
    if resize_mode == "squash":
        return input_size, input_size
    if resize_mode == "shortest":
        short, long = min(width, height), max(width, height)
        new_long = int(input_size * long / short)
        return (input_size, new_long) if width <= height else (new_long, input_size)
    if resize_mode == "longest":
        ratio = max(width / input_size, height / input_size)
        return round(width / ratio), round(height / ratio)
    raise UserError(f"resize mode {resize_mode!r} is not one of shortest, longest, squash")


def _crop_or_pad_offset(new: int, size: int) -> float:
    """Where pixel 0 of the resized side lands in the input: torchvision's CenterCrop starts the crop
    at ``round((new − size) / 2)``; open_clip's CenterCropOrPad pads ``(size − new) // 2`` first."""
    return -float(round((new - size) / 2)) if new >= size else float((size - new) // 2)


def boxes_to_input_frame(
    boxes: Tensor, image_size: tuple[int, int], input_size: int, resize_mode: str = "shortest"
) -> Tensor:
    """Map (K, 4) boxes from an original ``(width, height)`` image to the tower's square input.

    Mirrors open_clip's eval preprocessing exactly (`resized_size`, then the centre crop or pad):
    ``shortest`` = resize the short side to ``input_size`` then centre-crop (boxes are clipped to
    the crop); ``squash`` = resize each side to ``input_size``; ``longest`` = resize the long side
    then centre-pad. A box clipped to nothing by the crop comes back empty, and `check_boxes`
    refuses it.
    """
    width, height = image_size
    new_w, new_h = resized_size(image_size, input_size, resize_mode)
    sx, sy = new_w / width, new_h / height
    ox, oy = _crop_or_pad_offset(new_w, input_size), _crop_or_pad_offset(new_h, input_size)
    out = boxes.to(torch.float32) * torch.tensor([sx, sy, sx, sy]) + torch.tensor([ox, oy, ox, oy])
    return out.clamp(0, input_size)
