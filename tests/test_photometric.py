"""Tests for adclr.train.photometric: each operation against torchvision's own, and the per-view draw rates."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from adclr.train.photometric import (BRIGHTNESS, CONTRAST, HUE, SATURATION, DinoPhotometric, adjust_hue, blend,
                                     gaussian_blur, grayscale, solarize)

IDENTITY = dict(blur_p=0.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def views(n=4, height=20, width=28, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def per_view(fn, x: torch.Tensor, values) -> torch.Tensor:
    """torchvision's functional op, one view and one value at a time: the reference."""
    return torch.stack([fn(view, float(value)) for view, value in zip(x, values)])


@pytest.mark.parametrize("operation, reference", [(BRIGHTNESS, TF.adjust_brightness), (CONTRAST, TF.adjust_contrast),
                                                  (SATURATION, TF.adjust_saturation)])
def test_blend_equals_torchvision_per_view(operation, reference):
    x = views()
    factor = torch.tensor([0.6, 1.0, 1.25, 1.4])
    out = blend(x, factor, torch.full((4,), operation))
    torch.testing.assert_close(out, per_view(reference, x, factor), atol=1e-6, rtol=0)
    assert torch.equal(out[1], x[1])  # factor 1 leaves a view exactly as it is


def test_blend_mixes_operations_per_view():
    x = views(3)
    factor = torch.tensor([1.3, 0.7, 1.1])
    out = blend(x, factor, torch.tensor([BRIGHTNESS, CONTRAST, SATURATION]))
    expected = [TF.adjust_brightness(x[0], 1.3), TF.adjust_contrast(x[1], 0.7), TF.adjust_saturation(x[2], 1.1)]
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-6, rtol=0)


def test_hue_grayscale_solarize_equal_torchvision():
    x = views()
    x[0, :, :4] = 0.5  # gray pixels: no hue at all
    shift = torch.tensor([-0.1, 0.03, 0.1, 0.5])
    torch.testing.assert_close(adjust_hue(x, shift), per_view(TF.adjust_hue, x, shift), atol=2e-6, rtol=0)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(solarize(x), TF.solarize(x, 128 / 255))


@pytest.mark.parametrize("height, width", [(32, 32), (9, 40), (96, 17)])
def test_gaussian_blur_equals_torchvision_per_view(height, width):
    x = views(3, height, width)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    expected = torch.stack([TF.gaussian_blur(v, [13, 13], [float(s)] * 2) for v, s in zip(x, sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 7 px"):
        gaussian_blur(views(1, 6, 20), sigma[:1])


def test_each_view_draws_its_own_brightness():
    """Brightness only, on a constant 0.5 image: each view is 0.5 f, f uniform in [0.6, 1.4], applied with p=0.8."""
    augment = DinoPhotometric(**dict(IDENTITY, jitter_p=0.8), contrast=0.0, saturation=0.0, hue=0.0)
    torch.manual_seed(0)
    x = torch.full((4000, 3, 8, 8), 0.5)
    out = augment(x)
    assert torch.equal(x, torch.full_like(x, 0.5))  # the input is not changed
    factor = out[:, 0, 0, 0] / 0.5
    assert (out == out[:, :1, :1, :1]).all()  # one factor per view, same for every pixel
    untouched = factor == 1
    assert 0.18 < untouched.float().mean() < 0.22
    drawn = factor[~untouched]
    assert drawn.min() >= 0.6 - 1e-6 and drawn.max() <= 1.4 + 1e-6
    assert abs(drawn.mean() - 1.0) < 0.02 and abs(drawn.std() - 0.8 / 12 ** 0.5) < 0.01
    assert drawn.min() < 0.62 and drawn.max() > 1.38


def test_flip_grayscale_blur_solarize_rates_per_view():
    """A horizontal ramp 0 -> 1 shows each operation: reversed (flip), equal channels (gray), smoothed (blur), white
    turned black (solarize). Per-view probabilities alternate between two settings, so n is even."""
    ramp = torch.linspace(0.0, 1.0, 16).expand(3, 16, 16).clone()
    ramp[1] *= 0.5
    n = 3000

    def rate(augment: DinoPhotometric, applied) -> torch.Tensor:
        torch.manual_seed(1)
        out = augment(ramp.expand(n, -1, -1, -1))
        return applied(out).float().view(-1, 2).mean(dim=0)

    flipped = rate(DinoPhotometric(**dict(IDENTITY, flip_p=0.5)), lambda o: o[:, 0, 0, 0] > o[:, 0, 0, -1])
    gray = rate(DinoPhotometric(**dict(IDENTITY, grayscale_p=0.2)), lambda o: (o[:, 0] == o[:, 1]).flatten(1).all(1))
    blurred = rate(DinoPhotometric(**dict(IDENTITY, blur_p=(1.0, 0.1) * (n // 2))),
                   lambda o: (o - ramp).abs().amax((1, 2, 3)) > 0)
    solarized = rate(DinoPhotometric(**IDENTITY, solarize_p=(0.0, 0.2) * (n // 2)), lambda o: o[:, 0, 0, -1] < 0.5)
    for measured, expected in ((flipped, (0.5, 0.5)), (gray, (0.2, 0.2)), (blurred, (1.0, 0.1)),
                               (solarized, (0.0, 0.2))):
        assert torch.allclose(measured, torch.tensor(expected), atol=0.04), (measured, expected)


def test_same_seed_same_views_and_per_view_probabilities_must_match():
    augment = DinoPhotometric(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    x = views(2, 24, 24)
    torch.manual_seed(3)
    first = augment(x)
    torch.manual_seed(3)
    assert torch.equal(augment(x), first)
    assert not torch.equal(augment(x), first)
    with pytest.raises(ValueError, match="blur_p gives 2 per-view probabilities for 3 views"):
        augment(views(3))
