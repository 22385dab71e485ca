"""What a user calls on a trained MM-GEM model: captions of images and regions through
transformers' `generate` (`caption`, `generate_ids`), and the `DualEncoder` interface that
`vla eval` and `vla.load` use (`encode_image`, `encode_text`, `encode_regions`), with boxes given in
each image's own pixels or in the tower's input frame. `MMGEM` (vla/models/mmgem/model.py) inherits
it; the network, its training forward and what each phase trains are there."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vla.errors import UserError
from vla.models.encoder import inference
from vla.models.mmgem.pool_aggregator import check_boxes


def until_eos(row: list[int], eos: int) -> list[int]:
    """A generated row up to, and without, the end-of-text token."""
    return row[: row.index(eos)] if eos in row else row



class MMGEMInterface:
    """Captioning and the `DualEncoder` interface of `MMGEM`, on its tower, projections, LM and
    tokenizer (the attributes `MMGEM.__init__` sets)."""

    # ------------------------------------------------------------------ captioning

    @property
    def mode_token_ids(self) -> list[int]:
        """``[EMB]``, ``[CAP]`` and the soft prompts: input-only tokens, never written in a caption.

        Their output rows are never trained towards (stage 2's soft prompts get freshly resized,
        frozen output rows), so decoding masks them rather than trusting their logits to be low.
        """
        return sorted(self.token_ids.values())

    def caption_inputs(self, pixels: Tensor, boxes: Sequence[Tensor] | None = None, soft: bool | None = None) -> Tensor:
        """``[BOS, V_in, prompt]`` (N, 1+P+k, d_lm; no BOS for an LM without one); soft prompts by
        default for regions when the model has them."""
        prefix = self.visual_prefix(self.image_embedding(pixels, boxes))
        n = prefix.shape[0]
        bos = self._bos_embedding().unsqueeze(0).expand(n, -1, -1)
        prompt = self.prompt_embeddings(self._use_soft_prompts(boxes, soft)).unsqueeze(0).expand(n, -1, -1)
        return torch.cat([bos, prefix, prompt], dim=1)

    def generate_ids(
        self,
        pixels: Tensor,
        boxes: Sequence[Tensor] | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        soft: bool | None = None,
    ) -> list[list[int]]:
        """Caption token ids per image (or region), up to and without end of text.

        transformers' ``generate`` with its KV cache, greedy (``num_beams=1``) or beam search.
        All inputs have the same length ``(1)+P+k``, so no padding is involved.
        """
        with inference(self):
            embeds = self.caption_inputs(pixels, boxes, soft)
            out = self.lm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                max_new_tokens=max_new_tokens or self.config.max_text_tokens + 1,
                num_beams=num_beams,
                do_sample=False,
                use_cache=True,
                eos_token_id=self.eos_id,
                pad_token_id=self.tokenizer.pad_token_id,
                suppress_tokens=self.mode_token_ids,
            )
        return [until_eos(row, self.eos_id) for row in out.tolist()]

    def caption(
        self, images: Sequence[Image.Image] | Tensor, boxes: Sequence[Any] | None = None, *,
        box_frame: str = "image", keys: Sequence[str] | None = None, **kwargs: Any
    ) -> list[str]:
        """Captions of images, or of their regions: ``boxes[b]`` (K_b, 4) as x1, y1, x2, y2 in image
        b's own pixels (``box_frame="image"``), mapped through the tower's resize and crop
        (`input_boxes`); ``box_frame="input"`` takes them in the tower's input pixels as they are
        (the only frame for pixel tensors). ``kwargs``: `generate_ids`' decoding options."""
        pixels = images if isinstance(images, Tensor) else self.pixels(images)
        if boxes is not None:
            boxes = self.frame_boxes(images, boxes, box_frame, keys)
        ids = self.generate_ids(pixels, boxes, **kwargs)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ the DualEncoder interface

    @property
    def device(self) -> torch.device:
        return self.h1.weight.device

    @property
    def text_context_length(self) -> int:
        """Tokens the embedding path reads at most: max_text_tokens caption tokens + [EMB] (+ BOS),
        counted as `text_token_counts` counts, so a text is reported truncated exactly when
        `tokenize` cuts it (CLIP's 16 or 77 likewise include its start and end tokens)."""
        return self.config.max_text_tokens + 1 + (self.bos_id is not None)

    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        if self.preprocess is None:
            raise UserError("this MM-GEM model was built without its image preprocessing; pass pixel tensors")
        return torch.stack([self.preprocess(im) for im in images]).to(self.device)

    def encode_image(self, images: Sequence[Image.Image], batch_size: int = 64) -> Tensor:
        with inference(self):
            out = [self.image_embedding(self.pixels(images[s : s + batch_size]))
                   for s in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(out), dim=-1).float().cpu() if out else torch.empty(0, self.embed_dim)

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        with inference(self):
            out = [self.text_embedding(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out), dim=-1).float().cpu() if out else torch.empty(0, self.embed_dim)

    def encode_regions(self, images: Sequence[Image.Image], boxes: Sequence[Any], *, box_frame: str = "image",
                       keys: Sequence[str] | None = None) -> Tensor:
        """(ΣK_b, D) normalised region embeddings h4(h1(RoIAlign)) over the full image, not a crop.
        ``boxes[b]`` (K_b, 4) are x1, y1, x2, y2 in image b's own pixels (``box_frame="image"``, what
        COCO and a detector give), mapped through the tower's resize and crop (`input_boxes`); or
        in the tower's input pixels with ``box_frame="input"``."""
        mapped = self.frame_boxes(images, boxes, box_frame, keys)
        with inference(self):
            out = self.region_embedding(self.pixels(images), [b.to(self.device) for b in mapped])
        return F.normalize(out, dim=-1).float().cpu()

    def frame_boxes(self, images: Sequence[Image.Image] | Tensor, boxes: Sequence[Any], box_frame: str,
                    keys: Sequence[str] | None = None) -> list[Tensor]:
        """Boxes in the tower's input pixels from ``box_frame``'s: ``image`` (each image's own
        pixels, `input_boxes`) or ``input`` (checked against the input size, used as they are)."""
        if box_frame == "image":
            if isinstance(images, Tensor):
                raise UserError("boxes in image pixels need the images (PIL), not pixel tensors; pass the "
                                "images, or boxes in the tower's input pixels with box_frame='input'")
            return self.input_boxes(images, boxes, keys)
        if box_frame != "input":
            raise UserError(f"box_frame {box_frame!r} is not one of image, input")
        size = self.input_size
        out = []
        for b, image_boxes in enumerate(boxes):
            t = torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4).cpu()
            check_boxes(t, size, size, f"{keys[b] if keys is not None else f'image {b}'} "
                                       f"(box_frame='input': the tower's {size}×{size} input)")
            out.append(t)
        return out

    @property
    def input_size(self) -> int:
        """The side of the tower's square input, as its preprocessing makes it."""
        spec = (self.vision_spec or {}).get("preprocess_cfg", {})
        size = spec.get("size", self.tower.image_size)
        return size if isinstance(size, int) else size[0]

    def input_boxes(self, images: Sequence[Image.Image], boxes: Sequence[Any],
                    keys: Sequence[str] | None = None) -> list[Tensor]:
        """Boxes given in each PIL image's own pixels → the tower's input pixels: through the same
        resize and centre crop as `preprocess` (`boxes_to_input_frame`, the resized side truncated
        as torchvision truncates it). A box that is empty, not finite, outside its image or
        cropped away is refused, naming ``keys[b]`` (the sample) when given."""
        from vla.models.mmgem.pool_aggregator import boxes_to_input_frame

        spec = (self.vision_spec or {}).get("preprocess_cfg", {})
        size = self.input_size
        if len(images) != len(boxes):
            raise UserError(f"{len(images)} images but {len(boxes)} box lists; pass one (K, 4) list per image")
        out = []
        for b, (image, image_boxes) in enumerate(zip(images, boxes)):
            key = keys[b] if keys is not None else f"image {b}"
            t = torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4).cpu()
            check_boxes(t, image.width, image.height, key)
            mapped = boxes_to_input_frame(t, image.size, size, spec.get("resize_mode", "shortest"))
            check_boxes(mapped, size, size, f"{key} (in the tower's {size}×{size} input)")
            out.append(mapped)
        return out
