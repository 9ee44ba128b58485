"""fer_exp.augment.BatchAugment: shapes, ranges, seeding, and each augmentation on its own."""

from __future__ import annotations

import pytest
import torch

from fer_exp.augment import BatchAugment, to_float
from fer_exp.config import load_config

H = W = 48
OFF = dict(flip=0.0, rotation=0.0, brightness=0.0, contrast=0.0, erasing=0.0)


def batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float():
    images = batch(4)
    x = to_float(images)
    assert x.shape == (4, 1, H, W) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], images.float() / 255.0)


@pytest.mark.parametrize("n", [1, 2, 33])
def test_default_output_shape_dtype_range(n):
    images = batch(n)
    before = images.clone()
    out = BatchAugment()(images, gen(0))
    assert out.shape == (n, 1, H, W)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(images, before), "the uint8 input must not be modified"


def test_strong_settings_stay_in_range():
    aug = BatchAugment(flip=0.5, rotation=45.0, brightness=0.9, contrast=0.9, erasing=1.0)
    out = aug(batch(32), gen(1))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_seed_same_output_different_seed_different_output():
    images = batch(16)
    aug = BatchAugment()
    a, b = aug(images, gen(7)), aug(images, gen(7))
    assert torch.equal(a, b)
    c = aug(images, gen(8))
    assert not torch.equal(a, c)


def test_generator_state_advances():
    """Two calls on one generator draw different augmentations (each epoch is new)."""
    images, g = batch(8), gen(3)
    aug = BatchAugment()
    assert not torch.equal(aug(images, g), aug(images, g))


def test_all_off_is_exactly_to_float():
    images = batch(16)
    out = BatchAugment(**OFF)(images, gen(0))
    assert torch.equal(out, to_float(images))


def test_flip_always_without_rotation_mirrors():
    images = batch(16)
    out = BatchAugment(**{**OFF, "flip": 1.0})(images, gen(0))
    assert torch.equal(out, to_float(images).flip(-1))


def test_flip_half_flips_some_and_keeps_others():
    images = batch(64)
    out = BatchAugment(**{**OFF, "flip": 0.5})(images, gen(0))
    x = to_float(images)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_tiny_rotation_is_close_to_identity():
    images = batch(8)
    out = BatchAugment(**{**OFF, "rotation": 1e-6})(images, gen(0))
    torch.testing.assert_close(out, to_float(images), atol=1e-4, rtol=0)


def test_tiny_rotation_with_flip_is_close_to_mirror():
    """Flip and rotation share one affine pass; with align_corners=False a flip lands on pixel centres."""
    images = batch(8)
    out = BatchAugment(**{**OFF, "rotation": 1e-6, "flip": 1.0})(images, gen(0))
    torch.testing.assert_close(out, to_float(images).flip(-1), atol=1e-4, rtol=0)


def test_rotation_changes_images_and_pads_with_zeros():
    images = torch.full((4, H, W), 200, dtype=torch.uint8)
    out = BatchAugment(**{**OFF, "rotation": 30.0})(images, gen(0))
    assert not torch.allclose(out, to_float(images))
    # the centre stays (a uniform image), corners turned out of the frame become black
    torch.testing.assert_close(out[:, 0, 20:28, 20:28], torch.full((4, 8, 8), 200 / 255), atol=1e-5, rtol=0)
    assert (out[:, 0, 0, 0] < 200 / 255).any() or (out[:, 0, -1, -1] < 200 / 255).any()


def test_brightness_scales_each_image_by_one_factor():
    images = torch.randint(20, 120, (16, H, W), dtype=torch.uint8, generator=gen(5))  # no clipping at 0.5 * 1.5
    b = 0.5
    out = BatchAugment(**{**OFF, "brightness": b})(images, gen(0))
    ratio = out / to_float(images)
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5, rtol=1e-5)
    assert (per_image[:, 0] >= 1 - b - 1e-6).all() and (per_image[:, 0] <= 1 + b + 1e-6).all()


def test_contrast_keeps_the_mean_without_clipping():
    images = torch.randint(100, 156, (16, H, W), dtype=torch.uint8, generator=gen(6))
    out = BatchAugment(**{**OFF, "contrast": 0.5})(images, gen(0))
    x = to_float(images)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    assert not torch.allclose(out, x)


def _rectangle(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    assert len(rows) and len(cols), "no erased pixels"
    top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    assert mask[top:bottom, left:right].all(), "erased pixels do not fill their bounding box"
    return top, bottom, left, right


def test_erasing_always_sets_one_rectangle_of_half_grey():
    n = 64
    images = batch(n)  # k / 255 is never exactly 0.5, so 0.5 marks the erased pixels
    out = BatchAugment(**{**OFF, "erasing": 1.0})(images, gen(0))
    x = to_float(images)
    areas = []
    for i in range(n):
        erased = out[i, 0] == 0.5
        top, bottom, left, right = _rectangle(erased)
        eh, ew = bottom - top, right - left
        assert int(erased.sum()) == eh * ew
        # 2%..33% of the image, give or take rounding each side to whole pixels
        tolerance = (eh + ew) / 2 + 0.25
        assert 0.02 * H * W - tolerance <= eh * ew <= 0.33 * H * W + tolerance, (eh, ew)
        assert torch.equal(out[i, 0][~erased], x[i, 0][~erased]), "pixels outside the rectangle changed"
        areas.append(eh * ew)
    assert len(set(areas)) > 10, "rectangle sizes should vary"


def test_erasing_never_when_zero_and_sometimes_when_half():
    images = batch(64)
    never = BatchAugment(**{**OFF, "erasing": 0.0})(images, gen(0))
    torch.testing.assert_close(never, to_float(images), atol=0, rtol=0)
    out = BatchAugment(**{**OFF, "erasing": 0.5})(images, gen(0))
    erased = [(out[i, 0] == 0.5).any().item() for i in range(64)]
    assert 10 < sum(erased) < 54


def test_batch_of_one():
    images = batch(1)
    for kwargs in (dict(), OFF, {**OFF, "flip": 1.0}, {**OFF, "erasing": 1.0}):
        out = BatchAugment(**kwargs)(images, gen(0))
        assert out.shape == (1, 1, H, W)
    assert torch.equal(BatchAugment(**{**OFF, "flip": 1.0})(images, gen(0)), to_float(images).flip(-1))


def test_from_config():
    cfg = load_config(overrides={"aug_flip": 0.1, "aug_rotation": 5, "aug_brightness": 0.3, "aug_contrast": 0.4,
                                 "aug_erasing": 0.6})
    aug = BatchAugment.from_config(cfg)
    assert (aug.flip, aug.rotation, aug.brightness, aug.contrast, aug.erasing) == (0.1, 5.0, 0.3, 0.4, 0.6)


def bright_square(n: int, half: int = 4) -> torch.Tensor:
    images = torch.zeros(n, H, W, dtype=torch.uint8)
    images[:, H // 2 - half:H // 2 + half, W // 2 - half:W // 2 + half] = 255
    return images


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) row and column of the bright mass of (N, 1, H, W) images."""
    rows = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    cols = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    mass = x[:, 0].sum(dim=(1, 2))
    return torch.stack([(x[:, 0] * rows).sum(dim=(1, 2)) / mass, (x[:, 0] * cols).sum(dim=(1, 2)) / mass], 1)


def test_shift_moves_faces_by_up_to_the_fraction_of_the_side():
    out = BatchAugment(**{**OFF, "shift": 0.1})(bright_square(64), gen(0))
    moved = centre_of_mass(out) - centre_of_mass(to_float(bright_square(1)))
    assert moved.abs().max() <= 0.1 * H + 0.5  # up to 4.8 px each way
    assert (moved.abs() > 1).float().mean() > 0.5  # most faces moved by more than a pixel
    assert torch.allclose(out.sum(dim=(1, 2, 3)), to_float(bright_square(64)).sum(dim=(1, 2, 3)), rtol=0.05)


def test_zoom_scales_faces_within_the_range_and_keeps_them_centred():
    out = BatchAugment(**{**OFF, "scale": 0.3})(bright_square(64, half=8), gen(0))
    area = out.sum(dim=(1, 2, 3)) / to_float(bright_square(1, half=8)).sum()
    assert area.min() >= 0.7 ** 2 - 0.05 and area.max() <= 1.3 ** 2 + 0.05
    assert area.max() - area.min() > 0.5  # some zoomed in, some out
    assert torch.allclose(centre_of_mass(out), torch.full((64, 2), H / 2 - 0.5), atol=0.3)
