"""Training augmentations applied to whole uint8 batches on the training device.

Per-sample random flip, rotation, shift, zoom, brightness/contrast jitter and random erasing, drawn
from one ``torch.Generator`` so that a seeded run repeats exactly. Flip, rotation, shift and zoom share
one affine resampling pass. The random numbers are drawn in one call (:meth:`BatchAugment.draw`) and
applied by a pure function of tensors (:meth:`BatchAugment.apply`), which ``torch.compile`` captures
with the model's forward (a CUDA graph records the whole of it). This replaces the per-sample PIL
pipeline of the usual FER2013 code (see ``benchmarks/throughput.py`` for the measured difference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1]: the input every model takes."""
    return images.unsqueeze(1).float().div_(255.0)


# the columns of BatchAugment.draw's random numbers, one per decision an image's augmentation makes
(ANGLE, FLIP, SHIFT_X, SHIFT_Y, ZOOM, BRIGHTNESS, CONTRAST, ERASE_AREA, ERASE_RATIO, ERASE_TOP, ERASE_LEFT,
 ERASE_APPLY) = range(12)
DRAWS = ERASE_APPLY + 1


class BatchAugment:
    """Random augmentation of a uint8 batch (N, H, W) -> float batch (N, 1, H, W) in [0, 1]."""

    def __init__(self, flip: float = 0.5, rotation: float = 10.0, brightness: float = 0.2,
                 contrast: float = 0.2, erasing: float = 0.25, erase_scale=(0.02, 0.33),
                 erase_ratio=(0.3, 3.3), erase_value: float = 0.5, shift: float = 0.0, scale: float = 0.0):
        self.flip, self.rotation, self.shift, self.scale = flip, rotation, shift, scale
        self.brightness, self.contrast = brightness, contrast
        self.erasing, self.erase_scale, self.erase_ratio, self.erase_value = erasing, erase_scale, erase_ratio, erase_value

    @classmethod
    def from_config(cls, cfg) -> "BatchAugment":
        return cls(cfg.aug_flip, cfg.aug_rotation, cfg.aug_brightness, cfg.aug_contrast, cfg.aug_erasing,
                   shift=cfg.aug_shift, scale=cfg.aug_scale)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.device, generator))

    @staticmethod
    def draw(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Every random number a batch's augmentation needs, in one call: (n, DRAWS) uniform in [0, 1).
        Apart from :meth:`apply` so that the augmentation is a pure function of tensors, which
        ``torch.compile`` fuses and a CUDA graph records with the model's step."""
        return torch.rand(n, DRAWS, device=device, generator=generator)

    def apply(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmentation of a uint8 batch (N, H, W) that ``draws`` (from :meth:`draw`) decide."""
        x = to_float(images)
        n, device = x.shape[0], x.device

        def uniform(column: int, low: float, high: float) -> torch.Tensor:
            return draws[:, column] * (high - low) + low

        if self.rotation > 0 or self.shift > 0 or self.scale > 0:
            angle = uniform(ANGLE, -math.radians(self.rotation), math.radians(self.rotation))
            sign = torch.where(draws[:, FLIP] < self.flip, -1.0, 1.0)
            cos, sin = torch.cos(angle), torch.sin(angle)
            tx = ty = torch.zeros_like(angle)
            if self.shift > 0:  # a fraction of the side; affine_grid's coordinates span 2 per side
                tx, ty = uniform(SHIFT_X, -2 * self.shift, 2 * self.shift), uniform(SHIFT_Y, -2 * self.shift, 2 * self.shift)
            if self.scale > 0:  # zoom in (> 1) or out (< 1): the sampling grid shrinks or grows
                zoom = uniform(ZOOM, 1 - self.scale, 1 + self.scale)
                cos, sin = cos / zoom, sin / zoom
            theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif self.flip > 0:
            flip = (draws[:, FLIP] < self.flip).view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)

        if self.brightness > 0:
            x = x * uniform(BRIGHTNESS, 1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)
        if self.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * uniform(CONTRAST, 1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1) + mean
        if self.brightness > 0 or self.contrast > 0:
            x = x.clamp(0.0, 1.0)

        if self.erasing > 0:
            h, w = x.shape[-2:]
            area = uniform(ERASE_AREA, *self.erase_scale) * h * w
            ratio = torch.exp(uniform(ERASE_RATIO, math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])))
            eh = torch.sqrt(area * ratio).round().clamp(1, h)
            ew = torch.sqrt(area / ratio).round().clamp(1, w)
            top = (draws[:, ERASE_TOP] * (h - eh + 1)).floor()
            left = (draws[:, ERASE_LEFT] * (w - ew + 1)).floor()
            rows = torch.arange(h, device=device).view(1, h, 1)
            cols = torch.arange(w, device=device).view(1, 1, w)
            box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
                   & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
            apply = (draws[:, ERASE_APPLY] < self.erasing).view(n, 1, 1)
            x = x.masked_fill((box & apply).unsqueeze(1), self.erase_value)
        return x
