"""Exported folders load with plain timm and give the source model's outputs."""
from __future__ import annotations

import json

import timm
import torch

import adclr  # noqa: F401
from adclr.export import export_model, timm_architecture
from adclr.weights import sha256_file


def test_export_round_trip_through_local_dir(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("adclr_vit_tiny", depth=2, img_size=64, patch_size=8).eval()
    info = export_model(model, tmp_path, name="tiny", source="unit test", metrics={"knn": 12.5})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["patch_size"] == 8 and config["model_args"]["depth"] == 2
    assert info["sha256"] == sha256_file(tmp_path / "model.safetensors")
    card = (tmp_path / "README.md").read_text()
    assert "license: apache-2.0" in card and "| knn | 12.5 |" in card and "unit test" in card
    assert "Training method: ADCLR" in card
    export_model(model, tmp_path / "dino", method="DINO (converted)")
    assert "Training method: DINO (converted)" in (tmp_path / "dino" / "README.md").read_text()

    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.forward_features(x), loaded.forward_features(x))


def test_timm_architecture_of_a_non_adclr_vit():
    model = timm.create_model("test_vit")
    builtin, args = timm_architecture(model)
    assert builtin == "test_vit" and args["embed_dim"] == model.embed_dim
