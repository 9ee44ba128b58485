"""Model zoo: every model maps (N, 1, 48, 48) pixels in [0, 1] to (N, num_classes) logits.

Each model normalises its own input, so callers only divide uint8 pixels by 255.
"""

from torch import nn

from fer_exp.classes import NUM_CLASSES
from fer_exp.models.cnn import FerCNN
from fer_exp.models.resnet import PretrainedWeightsError, TimmResNet18

MODEL_NAMES = ("cnn", "resnet18")

__all__ = ["MODEL_NAMES", "FerCNN", "PretrainedWeightsError", "TimmResNet18", "build_model", "check_pretrained",
           "count_parameters"]


def build_model(
    name: str,
    *,
    num_classes: int = NUM_CLASSES,
    input_size: int | None = None,
    freeze_depth: int = 0,
    pretrained: str = "none",
    dropout: float = 0.3,
) -> nn.Module:
    """Build a model by name; ``input_size`` None is the model's default (cnn 48, resnet18 112).
    freeze_depth applies to resnet18 only."""
    if name == "cnn":
        if (pretrained or "none").strip().lower() != "none":
            raise ValueError(f"pretrained={pretrained!r}: pretrained weights only apply to resnet18, not cnn")
        return FerCNN(num_classes=num_classes, dropout=dropout, input_size=48 if input_size is None else input_size)
    if name == "resnet18":
        return TimmResNet18(
            num_classes=num_classes,
            input_size=112 if input_size is None else input_size,
            freeze_depth=freeze_depth,
            pretrained=pretrained,
            dropout=dropout,
        )
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def check_pretrained(name: str, pretrained: str) -> None:
    """Loads the pretrained weights a run of ``name`` starts from once (ImageNet weights through timm's hub
    or cache, or a local file), so commands that start many runs (studies) can stop before the first one
    when they cannot be had; :class:`PretrainedWeightsError` says why."""
    if name == "resnet18" and (pretrained or "none").strip().lower() != "none":
        build_model(name, pretrained=pretrained)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
