"""Model zoo: shapes, parameter counts, local pretrained weights, offline ImageNet, freezing."""

import socket
import sys

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv
from torch import nn

from fer_exp.classes import IMAGE_SIZE, NUM_CLASSES
from fer_exp.models import MODEL_NAMES, PretrainedWeightsError, build_model, count_parameters
from fer_exp.models.resnet import GRAY_MEAN, GRAY_STD


def faces(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- cnn


def test_cnn_parameter_count_and_shapes():
    model = build_model("cnn").eval()
    assert count_parameters(model) == (584_807, 584_807)
    assert model.load_report is None
    shapes = {}
    for name in ("block1", "block2", "block3", "block4"):
        hook = lambda module, inputs, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))  # noqa: E731
        getattr(model, name).register_forward_hook(hook)
    with torch.no_grad():
        out = model(faces(3))
    assert out.shape == (3, NUM_CLASSES)
    assert shapes == {"block1": (32, 24, 24), "block2": (64, 12, 12), "block3": (128, 6, 6), "block4": (256, 6, 6)}
    assert "mean" not in model.state_dict()  # normalisation buffers are not checkpointed


@pytest.mark.parametrize("size,block4", [(64, (256, 8, 8)), (96, (256, 12, 12))])
def test_cnn_at_a_larger_input_size_upsamples_with_the_same_parameters(size, block4):
    model = build_model("cnn", input_size=size).eval()
    assert count_parameters(model) == (584_807, 584_807)
    seen = {}
    model.block4.register_forward_hook(lambda module, inputs, out: seen.__setitem__("block4", tuple(out.shape[1:])))
    with torch.no_grad():
        out = model(faces(2))  # 48x48 in, resized inside
    assert out.shape == (2, NUM_CLASSES) and seen["block4"] == block4
    native = build_model("cnn").eval()
    native.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(native(faces(2)), out)  # the size really changes what the model sees


@pytest.mark.parametrize("size", [0, 20, 7])
def test_cnn_rejects_bad_input_sizes(size):
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model("cnn", input_size=size)


def test_cnn_rejects_pretrained():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("cnn", pretrained="imagenet")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg16")
    assert MODEL_NAMES == ("cnn", "resnet18")


# ---------------------------------------------------------------- resnet18, random init


@pytest.mark.parametrize("input_size", [112, 224])
def test_resnet_output_shape(input_size):
    model = build_model("resnet18", input_size=input_size).eval()
    assert model.load_report is None
    with torch.no_grad():
        assert model(faces(2)).shape == (2, NUM_CLASSES)
    assert model.backbone.conv1.weight.shape == (64, 1, 7, 7)


@pytest.mark.parametrize(
    "kwargs",
    [dict(input_size=0), dict(input_size=100), dict(input_size=16), dict(freeze_depth=6), dict(freeze_depth=-1)],
)
def test_resnet_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_model("resnet18", **kwargs)


# ---------------------------------------------------------------- resnet18, local pretrained weights


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A torchvision resnet18 .pth and a timm resnet18 .safetensors, both RGB / 1000 classes, random weights."""
    tmp = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    for m in tv.modules():  # non-trivial BN statistics, so loading them is really checked
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    torch.save(tv.state_dict(), tmp / "tv.pth")
    tm = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp / "timm.safetensors"))
    return {
        "tv.pth": (tmp / "tv.pth", tv.state_dict()),
        "timm.safetensors": (tmp / "timm.safetensors", tm.state_dict()),
    }


def test_timm_and_torchvision_share_key_names():
    tv = torchvision.models.resnet18(weights=None).state_dict()
    tm = timm.create_model("resnet18", pretrained=False).state_dict()
    assert {k: v.shape for k, v in tv.items()} == {k: v.shape for k, v in tm.items()}


@pytest.mark.parametrize("name", ["tv.pth", "timm.safetensors"])
def test_load_local_weights(weight_files, name):
    path, ref = weight_files[name]
    model = build_model("resnet18", pretrained=str(path))
    got = model.backbone.state_dict()
    assert torch.equal(got["conv1.weight"], adapt_input_conv(1, ref["conv1.weight"]))
    assert torch.allclose(got["conv1.weight"], ref["conv1.weight"].sum(dim=1, keepdim=True))
    for k, v in ref.items():
        if k != "conv1.weight" and not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert model.backbone.fc.weight.shape == (NUM_CLASSES, 512)
    report = model.load_report
    assert str(path) in report and "conv1 folded RGB->gray" in report
    assert f"re-initialised for {NUM_CLASSES} classes (file had 1000)" in report


def test_load_wrapped_checkpoint(weight_files, tmp_path):
    """{"state_dict": ...} wrappers and DataParallel's `module.` prefix are unwrapped."""
    _, ref = weight_files["tv.pth"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    model = build_model("resnet18", pretrained=str(tmp_path / "ckpt.pt"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, ref["layer4.1.conv2.weight"])


def test_gray_model_matches_rgb_model_on_repeated_input(weight_files):
    """1-channel conv1 = adapt_input_conv(RGB conv1) on x == the RGB model on x repeated 3 times."""
    path, _ = weight_files["timm.safetensors"]
    rgb = timm.create_model("resnet18", pretrained=False)
    rgb.load_state_dict(load_file(str(path)))
    gray = build_model("resnet18", pretrained=str(path), num_classes=1000, input_size=IMAGE_SIZE)
    assert "fc" not in gray.load_report  # same head size: fc loaded too
    rgb.eval(), gray.eval()
    x = faces(2)
    with torch.no_grad():
        want = rgb(((x - GRAY_MEAN) / GRAY_STD).repeat(1, 3, 1, 1))
        got = gray(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_wrong_shape_file(weight_files, tmp_path):
    _, ref = weight_files["tv.pth"]
    bad = dict(ref)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    match = r"layer2\.0\.conv1\.weight: expected \(128, 64, 3, 3\), found \(128, 64, 5, 5\)"
    with pytest.raises(PretrainedWeightsError, match=match):
        build_model("resnet18", pretrained=str(tmp_path / "bad.pth"))


def test_resnet34_file_is_rejected(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedWeightsError, match=r"unexpected keys .*layer1\.2\.conv1\.weight"):
        build_model("resnet18", pretrained=str(tmp_path / "r34.pth"))


def test_resnet50_file_is_rejected(tmp_path):
    r50 = torchvision.models.resnet50(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in r50.items()}, str(tmp_path / "r50.safetensors"))
    match = r"shape mismatch .*layer1\.0\.conv1\.weight: expected \(64, 64, 3, 3\), found \(64, 64, 1, 1\)"
    with pytest.raises(PretrainedWeightsError, match=match):
        build_model("resnet18", pretrained=str(tmp_path / "r50.safetensors"))


def test_missing_keys_file(weight_files, tmp_path):
    _, ref = weight_files["tv.pth"]
    torch.save({k: v for k, v in ref.items() if not k.startswith("layer4.")}, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match=r"missing keys .*layer4\.0\.conv1\.weight"):
        build_model("resnet18", pretrained=str(tmp_path / "partial.pth"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        build_model("resnet18", pretrained=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PretrainedWeightsError, match="Could not read"):
        build_model("resnet18", pretrained=str(tmp_path / "junk.safetensors"))


# ---------------------------------------------------------------- resnet18, ImageNet download offline


def test_imagenet_offline_raises_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if "huggingface_hub" in sys.modules:  # it reads these variables once, at import
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # whatever happens, nothing can hang on a socket
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(PretrainedWeightsError, match="--pretrained none") as info:
        build_model("resnet18", pretrained="imagenet")
    assert "--pretrained PATH" in str(info.value) and "HF_HOME" in str(info.value)


# ---------------------------------------------------------------- resnet18, freezing

GROUPS = ("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)


@pytest.mark.parametrize("k", range(6))
def test_freeze_depth(k):
    model = build_model("resnet18", freeze_depth=k)
    frozen_prefixes = tuple(f"{name}." for group in GROUPS[:k] for name in group)
    names = {n for n, _ in model.backbone.named_parameters()}
    want_frozen = {n for n in names if n.startswith(frozen_prefixes)}
    assert {n for n, p in model.backbone.named_parameters() if not p.requires_grad} == want_frozen
    assert model.backbone.fc.weight.requires_grad and model.backbone.fc.bias.requires_grad
    trainable, total = count_parameters(model)
    assert total - trainable == sum(p.numel() for n, p in model.backbone.named_parameters() if n in want_frozen)

    model.train()
    bns = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for n, m in bns.items():
        assert m.training == (not f"{n}.".startswith(frozen_prefixes)), n
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    model(faces(4))
    for n, m in bns.items():
        changed = not torch.equal(before[n], m.running_mean)
        assert changed == (not f"{n}.".startswith(frozen_prefixes)), n

    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert model.backbone.fc.training and model.training


class _RunsCode:
    """An object whose unpickling would call a function: what weights_only=True refuses."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_weights_file_with_pickled_objects_is_refused_without_running_them(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "payload": _RunsCode()}, path)
    with pytest.raises(PretrainedWeightsError, match="refused: besides tensors it holds pickled Python objects"):
        build_model("resnet18", pretrained=str(path))
    assert "this ran while loading" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>404 Not Found</html>", bytes(range(256)) * 8],
                         ids=["html page", "random bytes"])
def test_a_weights_file_that_is_no_torch_file_is_said_to_be_one_of_another_kind(tmp_path, content):
    """Was: "refused: besides tensors it holds pickled Python objects" (the unpickler's error for any bytes)."""
    path = tmp_path / "resnet18.pth"
    path.write_bytes(content)
    with pytest.raises(PretrainedWeightsError, match=r"is not a PyTorch weights file \(a file of another kind") as info:
        build_model("resnet18", pretrained=str(path))
    assert "pickled" not in str(info.value) and "--pretrained none" in str(info.value)
