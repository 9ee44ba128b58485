"""timm ResNet18 for 48x48 grayscale faces: upsampled, 1 input channel, optional ImageNet init.

Pretrained weights come either from timm's hub download (`pretrained="imagenet"`) or from a local
ResNet18 state dict (`pretrained=PATH`, .safetensors or .pth). timm and torchvision name the
resnet18 tensors identically (conv1, bn1, layer1..layer4, fc), so either kind of file loads.
The RGB first conv is folded to one channel with timm's `adapt_input_conv` (a sum over the RGB
filters: the same function as feeding the gray image three times), and a head of another size
(e.g. ImageNet's 1000 classes) is dropped so `fc` stays freshly initialised.
"""

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fer_exp.classes import NUM_CLASSES
from fer_exp.errors import NOT_A_TORCH_FILE, torch_file_kind

# Grayscale ImageNet statistics: the means of the RGB ImageNet means (0.485, 0.456, 0.406)
# and stds (0.229, 0.224, 0.225).
GRAY_MEAN = 0.449
GRAY_STD = 0.226

# freeze_depth k freezes the first k of these groups, in order; fc is never frozen.
FREEZE_GROUPS = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

ALTERNATIVES = (
    "Alternatives: `--pretrained none` (random init), or `--pretrained PATH` to a local ResNet18 "
    "ImageNet state dict (.safetensors or .pth, timm or torchvision key names, e.g. torchvision's "
    "resnet18-f37072fd.pth or timm's resnet18 model.safetensors)."
)


def _timm():
    """timm, imported on first use: it costs seconds at start-up and only resnet18 needs it."""
    import timm
    import timm.models

    return timm


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded, read or matched to the model."""


class TimmResNet18(nn.Module):
    """(N, 1, 48, 48) pixels in [0, 1] -> (N, num_classes) logits, via a 1-channel timm resnet18."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        input_size: int = 112,
        freeze_depth: int = 0,
        pretrained: str = "none",
        dropout: float = 0.3,
    ):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32 or input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, at least 32 (e.g. 112 or 224), got {input_size!r}")
        if isinstance(freeze_depth, bool) or freeze_depth not in range(len(FREEZE_GROUPS) + 1):
            raise ValueError(f"freeze_depth must be an integer in 0..{len(FREEZE_GROUPS)}, got {freeze_depth!r}")
        self.input_size = input_size
        self.freeze_depth = freeze_depth
        self.register_buffer("mean", torch.tensor(GRAY_MEAN).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(GRAY_STD).view(1, 1, 1, 1), persistent=False)

        kind = (pretrained or "none").strip()
        kwargs = dict(num_classes=num_classes, in_chans=1, drop_rate=dropout)
        self.load_report: str | None = None
        if kind.lower() == "none":
            self.backbone = _timm().create_model("resnet18", pretrained=False, **kwargs)
        elif kind.lower() == "imagenet":
            self.backbone = create_imagenet_backbone(**kwargs)
            tag = self.backbone.pretrained_cfg.get("hf_hub_id") or self.backbone.pretrained_cfg.get("tag") or "?"
            self.load_report = (
                f"loaded timm ImageNet resnet18 weights ({tag}); conv1 folded RGB->gray by timm; "
                f"fc re-initialised for {num_classes} classes"
            )
        else:
            self.backbone = _timm().create_model("resnet18", pretrained=False, **kwargs)
            self.load_report = load_local_weights(self.backbone, kind)

        for name, p in self.backbone.named_parameters():
            if name.split(".")[0] in self.frozen_names():
                p.requires_grad_(False)

    def frozen_names(self) -> set[str]:
        return {name for group in FREEZE_GROUPS[: self.freeze_depth] for name in group}

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen layers (their BatchNorm statistics) stay in eval mode."""
        super().train(mode)
        for name in self.frozen_names():
            getattr(self.backbone, name).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone((x - self.mean) / self.std)


def create_imagenet_backbone(**kwargs) -> nn.Module:
    """timm's own download (Hugging Face hub, cached under $HF_HOME); any failure -> PretrainedWeightsError."""
    try:
        return _timm().create_model("resnet18", pretrained=True, **kwargs)
    except Exception as e:
        raise PretrainedWeightsError(
            f"Could not download the ImageNet resnet18 weights through timm ({type(e).__name__}: {e}). "
            "Are you offline, or is HF_HUB_OFFLINE set without the weights in the cache? "
            "timm caches hub downloads under $HF_HOME (default ~/.cache/huggingface); once downloaded there "
            f"they also load offline. {ALTERNATIVES}"
        ) from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors or torch .pth/.pt file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(
            f"Pretrained weights file not found: {path}. --pretrained takes 'none', 'imagenet' or a path "
            "to a ResNet18 state dict (.safetensors or .pth)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        kind = torch_file_kind(path)
        if kind not in ("zip", "pickle"):  # not a torch file at all: not an unsafe one
            raise PretrainedWeightsError(f"{path} is not a PyTorch weights file ({NOT_A_TORCH_FILE[kind]}); "
                                         f"{ALTERNATIVES}") from None
        raise PretrainedWeightsError(
            f"{path} was refused: besides tensors it holds pickled Python objects, which could run code when "
            "loaded. fer-exp loads weights with torch.load(weights_only=True); save a plain state dict "
            "(torch.save(model.state_dict(), ...)) or a .safetensors file instead.") from None
    except Exception as e:
        raise PretrainedWeightsError(f"Could not read pretrained weights from {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):  # training checkpoints often wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict of tensors (got {type(sd).__name__})")
    for prefix in ("module.", "backbone."):  # DataParallel / DDP wrappers, fer-exp's own TimmResNet18
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_local_weights(backbone: nn.Module, path: str) -> str:
    """Load a resnet18 state dict into the 1-channel timm `backbone`; returns a one-line report."""
    sd = read_state_dict(path)
    own = backbone.state_dict()
    notes = []

    w = sd.get("conv1.weight")
    if w is not None and w.ndim == 4 and w.shape[1] != own["conv1.weight"].shape[1]:
        sd["conv1.weight"] = _timm().models.adapt_input_conv(own["conv1.weight"].shape[1], w)
        notes.append(f"conv1 folded {'RGB' if w.shape[1] == 3 else f'{w.shape[1]}-channel'}->gray")
    fc, own_fc = sd.get("fc.weight"), own["fc.weight"]
    if fc is not None and fc.ndim == 2 and fc.shape[0] != own_fc.shape[0] and fc.shape[1] == own_fc.shape[1]:
        del sd["fc.weight"]
        sd.pop("fc.bias", None)
        notes.append(f"fc re-initialised for {own_fc.shape[0]} classes (file had {fc.shape[0]})")
    elif fc is None:
        notes.append("fc freshly initialised (file had no fc)")

    expected = [k for k in own if not k.startswith("fc.")] + [k for k in ("fc.weight", "fc.bias") if k in sd]
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    for what, keys in (("shape mismatch", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f" ... and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{what} ({len(keys)}): " + "; ".join(keys[:8]) + more)
    if problems:
        raise PretrainedWeightsError(
            f"{path} does not look like a ResNet18 state dict (timm/torchvision key names): " + " | ".join(problems)
        )
    backbone.load_state_dict(sd, strict=False)  # only fc (dropped above) and num_batches_tracked may be absent
    notes = "; ".join(notes or ["all layers loaded"])
    return f"loaded {len(sd)} tensors from {path} (timm/torchvision resnet18 names); {notes}"
