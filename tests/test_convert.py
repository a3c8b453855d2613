"""Checkpoint conversion against an independent, plainly written DINO-style ViT (DINO's key names and layouts)."""
from __future__ import annotations

import argparse
import json
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import adclr  # noqa: F401  registers the adclr archs
from adclr.convert import convert_checkpoint, read_source_checkpoint, to_timm_state_dict
from dino_reference import DinoViT

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def random_dino_vit(seed: int, **dims) -> DinoViT:
    """Random weights at scales that keep activations O(1), so every tensor matters in the outputs."""
    torch.manual_seed(seed)
    model = DinoViT(**dims).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.normal_(0, 1.0)
            elif p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def dino_head(prefix: str, dim: int, parametrized: bool) -> dict[str, torch.Tensor]:
    """DINO's projection head keys; the last layer is weight-normed (old weight_g/v or new parametrizations names)."""
    g = torch.Generator().manual_seed(1)
    shapes = {"mlp.0.weight": (32, dim), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
              "mlp.4.weight": (16, 32), "mlp.4.bias": (16,)}
    head = {f"{prefix}{name}": torch.randn(shape, generator=g) for name, shape in shapes.items()}
    last = ("parametrizations.weight.original0", "parametrizations.weight.original1") if parametrized \
        else ("weight_g", "weight_v")
    head[f"{prefix}last_layer.{last[0]}"] = torch.ones(100, 1)
    head[f"{prefix}last_layer.{last[1]}"] = torch.randn(100, 16, generator=g)
    return head


def dino_checkpoint(teacher: DinoViT, student: DinoViT) -> dict:
    """DINO's main_dino.py save_dict: teacher unwrapped, student DDP-wrapped (`module.`), plus iBOT's masked_embed."""
    dim = teacher.pos_embed.shape[-1]
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "backbone.masked_embed": torch.randn(dim), **dino_head("head.", dim, parametrized=False)},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **dino_head("module.head.", dim, parametrized=True)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=100),
        "dino_loss": {"center": torch.zeros(1, 100)},
    }


@pytest.fixture(scope="module")
def dino_pair():
    return random_dino_vit(0, **TINY), random_dino_vit(1, **TINY)


@pytest.fixture(scope="module")
def dino_ckpt(dino_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "checkpoint.pth"
    torch.save(dino_checkpoint(*dino_pair), path)
    return path


def _images(size: int, batch: int = 2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def _tiny_timm(**kwargs):
    return timm.create_model("vit_small_patch16_224", num_classes=0, **{**TINY, **kwargs}).eval()


# ----------------------------------------------------------------------------------------------------------------------
def test_dino_training_checkpoint_round_trip_through_local_dir(dino_pair, dino_ckpt, tmp_path):
    info = convert_checkpoint(dino_ckpt, "adclr_vit_small", tmp_path, **TINY)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224" and config["model_args"]["embed_dim"] == 64
    assert info["architecture"] == "vit_small_patch16_224"
    card = (tmp_path / "README.md").read_text()
    assert "checkpoint.pth" in card and "'teacher' network" in card and "license: apache-2.0" in card

    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = _images(224)
    with torch.no_grad():
        expected, actual = dino_pair[0](x), loaded.forward_features(x)
    assert actual.shape == (2, 197, 64)
    assert (actual - expected).abs().max() < 1e-4  # [CLS] and patch tokens


def test_student_key_picks_the_student(dino_pair, dino_ckpt):
    obj = read_source_checkpoint(dino_ckpt)
    for key, network in zip(("teacher", "student"), dino_pair):
        state = to_timm_state_dict(obj, _tiny_timm(), key=key)
        reference = network.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_adclr_training_layout_with_compile_prefixes_and_mask_token():
    torch.manual_seed(0)
    source = _tiny_timm()
    backbone = source.state_dict()
    obj = {"student": {**{f"backbone._orig_mod.{k}": v + 1 for k, v in backbone.items()}, "head.mlp.0.weight":
                       torch.ones(3, 64)},
           "teacher": {**{f"_orig_mod.backbone.{k}": v for k, v in backbone.items()}, "mask_token": torch.zeros(1, 64),
                       "head.last_layer.weight_v": torch.ones(5, 64)},
           "epoch": 1}
    teacher = to_timm_state_dict(obj, _tiny_timm())
    student = to_timm_state_dict(obj, _tiny_timm(), key="student")
    assert teacher.keys() == student.keys() == backbone.keys()
    assert all(torch.equal(teacher[k], v) and torch.equal(student[k], v + 1) for k, v in backbone.items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_released_backbone_file_and_timm_classifier_state_dict(dino_pair, tmp_path, suffix):
    bare = dino_pair[0].state_dict()  # DINO's *_pretrain.pth layout: bare backbone keys
    path = tmp_path / f"dino_pretrain{suffix}"
    if suffix == ".safetensors":
        save_file(bare, path)
    else:
        torch.save(bare, path)
    state = to_timm_state_dict(read_source_checkpoint(path), _tiny_timm(), key="ignored-for-bare-files")
    assert all(torch.equal(state[k], bare[k]) for k in bare) and state.keys() == bare.keys()

    classifier = timm.create_model("vit_small_patch16_224", num_classes=10, **TINY).state_dict()
    state = to_timm_state_dict(classifier, _tiny_timm())
    assert "head.weight" in classifier and "head.weight" not in state and len(state) == len(classifier) - 2


class _Payload:
    """Unpickling this creates a file: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_carries_code_is_refused_and_not_run(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload really runs when unpickled unsafely

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 64)}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refused.*Nothing was executed") as err:
        convert_checkpoint(path, "vit_small_patch16_224", tmp_path / "out", **TINY)
    assert "io.open" in str(err.value) or "builtins.open" in str(err.value)  # names the offending global
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unsupported_file_type_is_named(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.npz'.*\.safetensors"):
        read_source_checkpoint(path)


def test_missing_unexpected_and_shape_diff_is_readable(dino_pair, dino_ckpt):
    obj = read_source_checkpoint(dino_ckpt)
    obj["teacher"]["backbone.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        to_timm_state_dict(obj, _tiny_timm(depth=3))
    msg = str(err.value)
    assert "does not fit vit_small_patch16_224 (embed_dim=64, depth=3" in msg
    assert "missing from the checkpoint (12): blocks.2.attn.proj.bias" in msg
    assert "unexpected in the checkpoint (1): extra.weight" in msg
    assert "--arch" in msg and "--key" in msg

    with pytest.raises(ValueError, match=r"shape differs .*\(\d+\): blocks\.0\.attn\.proj\.bias \(64,\) vs \(96,\)"):
        to_timm_state_dict(dino_pair[0].state_dict(), _tiny_timm(embed_dim=96))


def test_unknown_network_key_lists_the_networks(dino_ckpt):
    with pytest.raises(ValueError, match="no network 'ema'; its state dicts are: dino_loss, student, teacher"):
        to_timm_state_dict(read_source_checkpoint(dino_ckpt), _tiny_timm(), key="ema")


def test_dino_interpolation_matches_dino_at_288(dino_pair, dino_ckpt, tmp_path):
    x = _images(288)
    with torch.no_grad():
        expected = dino_pair[0](x)
    convert_checkpoint(dino_ckpt, "vit_small_patch16_224", tmp_path, img_size=288, dino_interpolation=True, **TINY)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    timm_way = _tiny_timm(img_size=288)
    timm_way.load_state_dict(to_timm_state_dict(read_source_checkpoint(dino_ckpt), timm_way))
    with torch.no_grad():
        dino_style, resized = loaded.forward_features(x), timm_way.forward_features(x)
    assert dino_style.shape == (2, 1 + 18 * 18, 64)
    assert (dino_style - expected).abs().max() < 1e-4
    assert (resized - expected).abs().max() > 1e-3  # timm's antialiased resize-to-size is a different resampling


def test_vit_small_dims_parity():
    reference = random_dino_vit(2, embed_dim=384, depth=12, num_heads=6)
    model = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    model.load_state_dict(to_timm_state_dict({"teacher": {f"backbone.{k}": v for k, v in
                                                          reference.state_dict().items()}}, model))
    x = _images(224, batch=1)
    with torch.no_grad():
        assert (model.forward_features(x) - reference(x)).abs().max() < 1e-4


@pytest.mark.parametrize("size_args", [["--img-size", "320x480"], ["--img-size", "320,480"],
                                       ["--model-args", json.dumps({**TINY, "img_size": [320, 480]})]])
def test_non_square_size_from_the_command_line(dino_pair, dino_ckpt, tmp_path, size_args):
    from adclr.cli import main

    args = ["convert", str(dino_ckpt), "--arch", "vit_small_patch16_224", "--out", str(tmp_path),
            "--dino-interpolation", "--model-args", json.dumps(TINY)]
    assert main(args + size_args) == 0
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["img_size"] == [320, 480]
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, 320, 480, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, actual = dino_pair[0](x), loaded.forward_features(x)
    assert actual.shape == (1, 1 + 20 * 30, 64)
    assert (actual - expected).abs().max() < 1e-4


def test_dino_interpolation_acts_at_the_conversion_size_only(dino_pair, dino_ckpt, tmp_path, caplog, capsys):
    from adclr.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "match DINO's at the --img-size only" in " ".join(capsys.readouterr().out.split())  # the help says so
    native, plain = tmp_path / "native", tmp_path / "plain"
    convert_checkpoint(dino_ckpt, "vit_small_patch16_224", native, dino_interpolation=True, **TINY)
    assert "dino_interpolation has no effect" in caplog.text
    convert_checkpoint(dino_ckpt, "vit_small_patch16_224", plain, **TINY)
    assert (native / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()

    # converted at 288 the DINO way, run at 320: timm's own resampling, not DINO's (the gap the help states)
    convert_checkpoint(dino_ckpt, "vit_small_patch16_224", tmp_path / "at288", img_size=288, dino_interpolation=True,
                       **TINY)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'at288'}", pretrained=True, dynamic_img_size=True).eval()
    x = _images(320)
    with torch.no_grad():
        gap = (loaded.forward_features(x) - dino_pair[0](x)).abs().max()
    assert gap > 1e-3
