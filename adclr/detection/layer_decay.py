"""Layer-wise learning-rate decay for ViT fine-tuning (BEiT/MAE recipe).

Early blocks hold generic pretrained features and should move less than late blocks and new heads:
block i trains at lr * decay ** (depth - i), the stem at lr * decay ** (depth + 1), everything else at lr.
"""
from collections.abc import Iterable

from timm.models.vision_transformer import VisionTransformer
from torch import nn

STEM = ('cls_token', 'reg_token', 'dist_token', 'pos_embed', 'patch_embed', 'norm_pre')


def vit_layer_id(name: str, num_blocks: int) -> int:
    """0 for the stem, i + 1 for block i, num_blocks + 1 for the rest; `name` is relative to the ViT."""
    head, _, rest = name.partition('.')
    if head in STEM:
        return 0
    if head == 'blocks':
        return int(rest.partition('.')[0]) + 1
    return num_blocks + 1


def _find_vit(model: nn.Module) -> tuple[str, VisionTransformer]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, VisionTransformer)]
    if len(found) != 1:
        where = ', '.join(repr(n) for n, _ in found) or 'none'
        raise ValueError(f'param_groups_lrd needs exactly one timm VisionTransformer inside '
                         f'{type(model).__name__}, found {len(found)} ({where}); pass the model that holds one')
    name, vit = found[0]
    return (name + '.' if name else ''), vit


def param_groups_lrd(
        model: nn.Module,
        lr: float,
        weight_decay: float,
        layer_decay: float = 0.75,
        no_weight_decay_names: Iterable[str] | None = None,
) -> list[dict]:
    """Optimizer param groups for a bare timm ViT or a model containing one (e.g. a detector).

    Each trainable parameter appears exactly once. No weight decay on 1-D parameters (norms, biases) or on
    parameters whose last name component is in `no_weight_decay_names` (default: the ViT's own
    `no_weight_decay()`, i.e. tokens and position embeddings). Groups carry `lr` (already scaled),
    `lr_scale` (for schedulers that rescale a base lr) and `layer_id`.
    """
    prefix, vit = _find_vit(model)
    depth = len(vit.blocks)
    skip = set(vit.no_weight_decay() if no_weight_decay_names is None else no_weight_decay_names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name[len(prefix):], depth) if name.startswith(prefix) else depth + 1
        decay = p.ndim > 1 and name.rpartition('.')[2] not in skip
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, decay), {
            'params': [], 'lr': lr * scale, 'lr_scale': scale,
            'weight_decay': weight_decay if decay else 0.0, 'layer_id': layer})
        group['params'].append(p)
    return [groups[key] for key in sorted(groups)]
