"""A small VGG-style CNN for 48x48 grayscale faces (584,807 parameters)."""

import torch
import torch.nn.functional as F
from torch import nn

from fer_exp.classes import NUM_CLASSES

PIXEL_MEAN = 0.5  # inputs are pixels in [0, 1]; roughly centre and scale them
PIXEL_STD = 0.25


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """2 x (conv3x3 + BN + ReLU), then halve the resolution."""
    return nn.Sequential(*conv_bn_relu(c_in, c_out), *conv_bn_relu(c_out, c_out), nn.MaxPool2d(2))


class FerCNN(nn.Module):
    """(N, 1, 48, 48) pixels in [0, 1] -> (N, num_classes) logits.

    block1 32x24x24 -> block2 64x12x12 -> block3 128x6x6 -> block4 256x6x6 -> GAP -> Linear (at 48 px).
    With ``input_size`` above 48 the faces are upsampled first (bilinear); global average pooling
    makes the same 584,807 parameters work at any size.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.3, input_size: int = 48):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 16 or input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, at least 16 (e.g. 48, 64 or 96), got {input_size!r}")
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 1, 1, 1), persistent=False)
        self.block1 = conv_block(1, 32)
        self.block2 = conv_block(32, 64)
        self.block3 = conv_block(64, 128)
        self.block4 = nn.Sequential(*conv_bn_relu(128, 256), nn.Dropout2d(dropout))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)
        self.load_report: str | None = None  # no pretrained weights for this model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(self.pool(x).flatten(1))
