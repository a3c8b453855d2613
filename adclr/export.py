"""Export a backbone as a plain timm model folder: `model.safetensors`, `config.json`, `README.md` (model card).

`config.json` names timm's built-in architecture with the exact dims as model_args, so
`timm.create_model('hf-hub:ORG/REPO', pretrained=True)` and `'local-dir:DIR'` load the folder without adclr installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import timm
from timm.models import VisionTransformer, save_for_hf

from .models import TIMM_EQUIVALENT
from .vit import check_vit
from .weights import sha256_file

WEIGHTS_NAME = "model.safetensors"
#: config.json key naming the ADCLR arch an exported folder came from (timm ignores it).
ADCLR_ARCH_KEY = "adclr_architecture"
ADCLR_METHOD = ("ADCLR (Zhang et al., ICLR 2023, arXiv:2306.13337); its query tokens are a training device and leave "
                "no parameters behind")


def timm_architecture(model: VisionTransformer) -> tuple[str, dict[str, Any]]:
    """(built-in timm architecture, model_args) that rebuild `model` exactly with plain timm."""
    check_vit(model, conv_patch_embed=False)
    arch = model.pretrained_cfg.get("architecture") or ""
    builtin = TIMM_EQUIVALENT.get(arch, arch)
    if builtin not in timm.list_models() or builtin.startswith("adclr_"):
        builtin = "vit_base_patch16_224"  # any classic ViT entrypoint: the dims below define the model
    dims = dict(
        patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
    )
    return builtin, {**getattr(model, "_model_args", {}), **dims}


def _model_card(name: str, builtin: str, license: str, description: str, source: str, method: str,
                metrics: Mapping[str, Any]) -> str:
    metric_lines = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    metric_table = f"\n## Metrics\n| metric | value |\n|---|---|\n{metric_lines}\n" if metrics else ""
    return f"""---
license: {license}
library_name: timm
tags: [image-feature-extraction, timm, adclr, self-supervised]
---
# {name}

{description or 'A self-supervised ViT backbone.'} A plain timm `{builtin}`-family VisionTransformer with no
classifier head (`num_classes=0`).

- Source: {source or 'not stated'}
- Training method: {method}
{metric_table}
## Load
```python
import timm
model = timm.create_model("hf-hub:ORG/REPO", pretrained=True)   # or "local-dir:PATH" for this folder
```

## Citation
```bibtex
@inproceedings{{zhang2023adclr,
  title={{Patch-Level Contrasting without Patch Correspondence for Accurate and Dense Contrastive Representation Learning}},
  author={{Zhang, Shaofeng and Zhu, Feng and Zhao, Rui and Yan, Junchi}},
  booktitle={{ICLR}},
  year={{2023}}
}}
```
"""


def export_model(model: VisionTransformer, out_dir: str | Path, *, name: str = "adclr backbone",
                 license: str = "apache-2.0", description: str = "", source: str = "", method: str = ADCLR_METHOD,
                 metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the folder and return what a manifest entry needs: path, sha256 and size of the weights file.

    `method` names how the weights were trained on the card (converted checkpoints say what they came from)."""
    out_dir = Path(out_dir)
    builtin, model_args = timm_architecture(model)
    model_config: dict[str, Any] = {"pretrained_cfg": {"architecture": builtin, "license": license}}
    arch = model.pretrained_cfg.get("architecture")
    if arch in TIMM_EQUIVALENT:  # several ADCLR archs share one built-in, so `adclr publish` reads the name here
        model_config[ADCLR_ARCH_KEY] = arch
    save_for_hf(model, str(out_dir), model_config=model_config, model_args=model_args, safe_serialization=True)
    (out_dir / "README.md").write_text(
        _model_card(name, builtin, license, description, source, method, dict(metrics or {})), encoding="utf-8")
    weights = out_dir / WEIGHTS_NAME
    return {"path": str(weights), "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size,
            "architecture": builtin}
