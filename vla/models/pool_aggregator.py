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
        boxes = [b.to(feature_map.device, feature_map.dtype) for b in boxes]
        bins = roi_align(
            feature_map,
            boxes,
            output_size=self.output_size,
            spatial_scale=1.0 / self.patch_size,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )  # (ΣK, C, s, s)
        return bins.mean(dim=(2, 3))


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


def boxes_to_input_frame(
    boxes: Tensor, image_size: tuple[int, int], input_size: int, resize_mode: str = "shortest"
) -> Tensor:
    """Map (K, 4) boxes from an original ``(width, height)`` image to the tower's square input.

    Mirrors open_clip's preprocessing: ``shortest`` = resize the short side to ``input_size``
    then centre-crop (boxes are clipped to the crop); ``squash`` = resize each side to
    ``input_size``; ``longest`` = resize the long side then centre-pad. A box clipped to nothing
    by the crop comes back empty, and `check_boxes` refuses it.
    """
    width, height = image_size
    boxes = boxes.to(torch.float32)
    if resize_mode == "squash":
        sx, sy, ox, oy = input_size / width, input_size / height, 0.0, 0.0
    elif resize_mode in ("shortest", "longest"):
        scale = input_size / (min(width, height) if resize_mode == "shortest" else max(width, height))
        new_w, new_h = round(width * scale), round(height * scale)
        sx, sy = new_w / width, new_h / height
        # torchvision's CenterCrop and open_clip's centre padding put the offset at round((new - size) / 2)
        ox, oy = -float(round((new_w - input_size) / 2)), -float(round((new_h - input_size) / 2))
    else:
        raise UserError(f"resize mode {resize_mode!r} is not one of shortest, longest, squash")
    out = boxes * torch.tensor([sx, sy, sx, sy]) + torch.tensor([ox, oy, ox, oy])
    return out.clamp(0, input_size)
