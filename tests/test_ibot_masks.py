import pytest
import torch

from adclr.train.ibot_masks import block_masks

GRID = (14, 14)
N = GRID[0] * GRID[1]


def masked_neighbours_per_masked_patch(masks: torch.Tensor) -> float:
    """Mean number of masked 4-neighbours of a masked patch (high for blocks, ~4*ratio for scattered)."""
    m = masks.float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return ((neighbours * m).sum() / m.sum()).item()


def test_shape_dtype_and_ratio_within_range():
    masks = block_masks(64, GRID, mask_ratio=(0.1, 0.5), generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, *GRID) and masks.dtype == torch.bool
    ratios = masks.flatten(1).sum(1) / N
    half_patch = 0.5 / N  # targets are rounded to whole patches
    assert ratios.min() >= 0.1 - half_patch and ratios.max() <= 0.5 + half_patch
    assert ratios.std() > 0.05  # the ratio is drawn per image, not fixed


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 1.0])
def test_fixed_ratio_hits_the_target_count_exactly(ratio):
    masks = block_masks(16, (8, 6), mask_ratio=(ratio, ratio), generator=torch.Generator().manual_seed(1))
    assert (masks.flatten(1).sum(1) == round(ratio * 48)).all()


def test_masks_are_blocks_not_scattered_patches():
    g = torch.Generator().manual_seed(2)
    masks = block_masks(64, GRID, mask_ratio=(0.3, 0.3), min_num_patches=16, generator=g)
    scattered = torch.zeros(64, N, dtype=torch.bool)
    for row in scattered:
        row[torch.randperm(N, generator=g)[: round(0.3 * N)]] = True
    scattered = scattered.reshape(64, *GRID)
    assert masked_neighbours_per_masked_patch(scattered) < 1.6
    assert masked_neighbours_per_masked_patch(masks) > 2.8


def test_single_block_is_one_rectangle():
    # Target 16 of 64 patches with min 16 per block and a square aspect ratio: one 4x4 rectangle.
    masks = block_masks(
        8, (8, 8), mask_ratio=(0.25, 0.25), min_num_patches=16, aspect_ratio=(1.0, 1.0),
        generator=torch.Generator().manual_seed(3),
    )
    for m in masks:
        rows, cols = m.nonzero().unbind(1)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_deterministic_with_a_generator():
    a = block_masks(8, GRID, generator=torch.Generator().manual_seed(7))
    b = block_masks(8, GRID, generator=torch.Generator().manual_seed(7))
    c = block_masks(8, GRID, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        block_masks(2, GRID, mask_ratio=(0.6, 0.2))
    with pytest.raises(ValueError, match="positive grid"):
        block_masks(2, (0, 14))
    with pytest.raises(ValueError, match="min_num_patches"):
        block_masks(2, GRID, min_num_patches=0)
