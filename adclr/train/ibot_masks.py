"""Block-wise patch masking for iBOT's masked-patch loss (BEiT-style random rectangles)."""

from __future__ import annotations

import math

import torch


def block_masks(
    batch: int,
    grid_hw: tuple[int, int],
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    min_num_patches: int = 4,
    generator: torch.Generator | None = None,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> torch.Tensor:
    """Masks of shape (B, h, w), True = masked, each a union of random rectangles.

    Per image a target count is drawn uniformly from `mask_ratio` (rounded to whole patches) and blocks
    of at least `min_num_patches` patches (fewer once less remain) with a log-uniform aspect ratio are
    added until the target is hit exactly; a block is accepted only if it adds new patches without
    overshooting. Contiguous blocks, unlike scattered patches, cannot be filled in from neighbours,
    which is what makes the prediction task semantic. After `max_attempts` rejected blocks in a row a
    single free patch (a 1x1 block) is added, so the loop always ends on the target.
    """
    h, w = grid_hw
    lo, hi = mask_ratio
    if batch < 0 or h < 1 or w < 1:
        raise ValueError(f"block_masks needs batch >= 0 and a positive grid, got batch={batch}, grid_hw={grid_hw}.")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"block_masks: mask_ratio must satisfy 0 <= low <= high <= 1, got {mask_ratio}.")
    if min_num_patches < 1 or max_attempts < 1:
        raise ValueError(
            f"block_masks: min_num_patches and max_attempts must be >= 1, got {min_num_patches} and {max_attempts}."
        )
    if not 0.0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"block_masks: aspect_ratio must be 0 < low <= high, got {aspect_ratio}.")

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=generator).item()

    def randint(high: int) -> int:
        return int(torch.randint(high, (), generator=generator))

    log_ar = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
    masks = torch.zeros(batch, h, w, dtype=torch.bool)
    for mask in masks:
        target = round(uniform(lo, hi) * h * w)
        count, failures = 0, 0
        while count < target:
            remaining = target - count
            area = uniform(min(min_num_patches, remaining), remaining)
            ar = math.exp(uniform(*log_ar))
            bh = min(h, max(1, round(math.sqrt(area * ar))))
            bw = min(w, max(1, round(math.sqrt(area / ar))))
            top, left = randint(h - bh + 1), randint(w - bw + 1)
            added = int((~mask[top : top + bh, left : left + bw]).sum())
            if 0 < added <= remaining:
                mask[top : top + bh, left : left + bw] = True
                count, failures = count + added, 0
                continue
            failures += 1
            if failures >= max_attempts:
                free = (~mask).flatten().nonzero().squeeze(1)
                mask.view(-1)[free[randint(len(free))]] = True
                count, failures = count + 1, 0
    return masks


class GlobalViewMasks:
    """iBOT's masks for one batch: per global view, block masks (B, N) bool, each image masked with probability
    ``probability`` (an unmasked image gets an all-False row). Drawn in the collate, so the masks come with the batch
    from the same random stream as its crops."""

    def __init__(self, grid_hw: tuple[int, int], mask_ratio: tuple[float, float], probability: float,
                 num_views: int = 2) -> None:
        self.grid_hw, self.mask_ratio, self.probability, self.num_views = grid_hw, mask_ratio, probability, num_views

    def __call__(self, batch: int) -> list[torch.Tensor]:
        masks = []
        for _ in range(self.num_views):
            m = block_masks(batch, self.grid_hw, mask_ratio=self.mask_ratio)
            keep = torch.rand(batch) < self.probability
            masks.append((m & keep[:, None, None]).flatten(1))
        return masks
