"""Convert -> publish -> Hub (olah on 127.0.0.1) -> timm, and `verify` of manifest entries."""
from __future__ import annotations

import types
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch

from adclr.convert import convert_checkpoint
from adclr.export import export_model
from adclr.manifest import ManifestError, parse_manifest
from adclr.publish import REVISION_PLACEHOLDER, default_entry_name, publish, verify
from conftest import run_python
from test_convert import TINY, dino_checkpoint, random_dino_vit

FOLDER_FILES = ("model.safetensors", "config.json", "README.md")


@pytest.fixture(scope="module")
def dino_tiny(tmp_path_factory):
    """A DINO-style training checkpoint converted with adclr, and the reference teacher it came from."""
    root = tmp_path_factory.mktemp("dino_tiny")
    teacher, student = random_dino_vit(0, **TINY), random_dino_vit(1, **TINY)
    torch.save(dino_checkpoint(teacher, student), root / "checkpoint.pth")
    convert_checkpoint(root / "checkpoint.pth", "adclr_vit_small", root / "out", **TINY)
    return {"teacher": teacher, "ckpt": root / "checkpoint.pth", "dir": root / "out"}


def _files(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in FOLDER_FILES}


def _entry_toml(name: str, repo_id: str, revision: str, sha256: str, size_bytes: int) -> str:
    return (f'["{name}"]\nhf_hub_id = "{repo_id}"\nrevision = "{revision}"\nfilename = "model.safetensors"\n'
            f'sha256 = "{sha256}"\nsize_bytes = {size_bytes}\nlicense = "apache-2.0"\n')


def test_convert_publish_hub_round_trip_equals_source(local_hub, dino_tiny, tmp_path):
    entry_text = publish(dino_tiny["dir"], "adclr-test/dino-tiny", name="adclr_vit_small.dinotest",
                         source="DINO-style test checkpoint")
    assert REVISION_PLACEHOLDER in entry_text and "fill in" in entry_text
    with pytest.raises(ManifestError, match="revision"):
        parse_manifest(entry_text, "unfilled")  # the placeholder cannot slip into a manifest unnoticed

    revision = local_hub.add_repo("adclr-test/dino-tiny", _files(dino_tiny["dir"]))
    filled = entry_text.replace(REVISION_PLACEHOLDER, revision)
    entry = parse_manifest(filled, "filled")["adclr_vit_small.dinotest"]
    assert (entry.revision, entry.source, entry.size_bytes) == (revision, "DINO-style test checkpoint",
                                                                (dino_tiny["dir"] / "model.safetensors").stat().st_size)
    manifest = tmp_path / "weights.toml"
    manifest.write_text(filled)

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import sys, numpy as np, timm, torch
x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
plain = timm.create_model('hf-hub:adclr-test/dino-tiny', pretrained=True).eval()
assert 'adclr' not in sys.modules
import adclr
via_manifest = timm.create_model('adclr_vit_small.dinotest', pretrained=True, embed_dim=64, depth=2, num_heads=2).eval()
with torch.no_grad():
    np.save({str(tmp_path / 'plain.npy')!r}, plain.forward_features(x).numpy())
    np.save({str(tmp_path / 'manifest.npy')!r}, via_manifest.forward_features(x).numpy())
"""
    result = run_python(code, env={"ADCLR_WEIGHTS_MANIFEST": str(manifest)})
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = dino_tiny["teacher"](x)
    for name in ("plain", "manifest"):
        actual = torch.from_numpy(np.load(tmp_path / f"{name}.npy"))
        assert actual.shape == (2, 197, 64) and (actual - expected).abs().max() < 1e-4, name


def test_push_pins_the_commit_it_creates(local_hub, exported_tiny, monkeypatch, tmp_path):
    """The Hub's upload API is stood in by a commit to the local server; the entry must pin that commit."""
    uploads = []

    def upload_folder(*, repo_id, folder_path, token, commit_message):
        uploads.append((repo_id, commit_message))
        return types.SimpleNamespace(oid=local_hub.add_repo(repo_id, _files(Path(folder_path))))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, token, exist_ok: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    entry_text = publish(exported_tiny["dir"], "adclr-test/pushed-tiny", push=True)
    assert uploads == [("adclr-test/pushed-tiny", "Add adclr_vit_tiny.pushed-tiny weights")]
    entry = parse_manifest(entry_text, "pushed")["adclr_vit_tiny.pushed-tiny"]  # default name: arch + repo name
    assert entry.sha256 == exported_tiny["sha256"] and len(entry.revision) == 40

    monkeypatch.setenv("ADCLR_WEIGHTS_MANIFEST", str(tmp_path / "weights.toml"))
    (tmp_path / "weights.toml").write_text(entry_text)
    checks = [(c.name, c.status) for c in verify()]  # the packaged entries (the embedded demo) come along
    assert ("adclr_vit_tiny.pushed-tiny", "ok") in checks and all(status == "ok" for _, status in checks)


def test_publish_refuses_what_would_break_the_manifest(exported_tiny, tmp_path):
    with pytest.raises(ManifestError, match="revision.*40-hex.*'main'"):
        publish(exported_tiny["dir"], "adclr-test/x", revision="main")
    with pytest.raises(ValueError, match="with push the entry pins the commit"):
        publish(exported_tiny["dir"], "adclr-test/x", revision="a" * 40, push=True)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in FOLDER_FILES[:2]:
        (incomplete / name).write_bytes((exported_tiny["dir"] / name).read_bytes())
    with pytest.raises(ValueError, match="lacks README.md.*adclr convert"):
        publish(incomplete, "adclr-test/x")
    with pytest.raises(ValueError, match="test_vit is not one of the ADCLR archs.*--name"):
        default_entry_name("test_vit", "adclr-test/x")
    with pytest.raises(ValueError, match="must start with an ADCLR arch"):
        publish(exported_tiny["dir"], "adclr-test/x", name="vit_tiny_patch16_224.mine")

    entry = parse_manifest(publish(exported_tiny["dir"], "adclr-test/x", revision="b" * 40, name="adclr_vit_tiny.mine"),
                           "given revision")["adclr_vit_tiny.mine"]
    assert entry.revision == "b" * 40 and entry.hf_hub_id == "adclr-test/x"


@pytest.fixture
def three_entry_manifest(local_hub, exported_tiny, tmp_path, monkeypatch):
    """A manifest with a good entry, a wrong-hash entry (same file) and an entry whose repo does not exist."""
    repo_id = f"adclr-test/verify-{tmp_path.name}"
    revision = local_hub.add_repo(repo_id, _files(exported_tiny["dir"]))
    size = exported_tiny["size_bytes"]
    text = "\n".join([
        _entry_toml("adclr_vit_tiny.good", repo_id, revision, exported_tiny["sha256"], size),
        _entry_toml("adclr_vit_tiny.wrong", repo_id, revision, "0" * 64, size),
        _entry_toml("adclr_vit_tiny.absent", "adclr-test/never-published", "c" * 40, exported_tiny["sha256"], size),
    ])
    (tmp_path / "weights.toml").write_text(text)
    monkeypatch.setenv("ADCLR_WEIGHTS_MANIFEST", str(tmp_path / "weights.toml"))


def test_verify_reports_ok_mismatch_missing(three_entry_manifest, exported_tiny):
    checks = {c.name: c for c in verify()}
    assert {name: c.status for name, c in checks.items()} == {
        "adclr_vit_tiny.good": "ok", "adclr_vit_tiny.wrong": "mismatch", "adclr_vit_tiny.absent": "missing",
        "adclr_vit_mini_patch8.demo": "ok"}  # the packaged (embedded) entry is checked too
    assert exported_tiny["sha256"] in checks["adclr_vit_tiny.wrong"].detail
    assert "adclr-test/never-published" in checks["adclr_vit_tiny.absent"].detail
    assert [(c.name, c.ok) for c in verify(["adclr_vit_tiny.good"])] == [("adclr_vit_tiny.good", True)]
    with pytest.raises(ValueError, match="not in the weights manifest: adclr_vit_tiny.nope; known entries: "
                                         "adclr_vit_mini_patch8.demo, adclr_vit_tiny.good"):
        verify(["adclr_vit_tiny.nope"])


# ----------------------------------------------------------------------------------------------------------------------
# CLI: `adclr convert / publish / verify` through adclr.cli.main (needs the lifecycle commands in adclr/cli.py).
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_convert_then_publish_prints_the_entry(dino_tiny, tmp_path, capsys):
    from adclr.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(dino_tiny["ckpt"]), "--arch", "adclr_vit_small", "--out", str(out),
                 "--model-args", '{"embed_dim": 64, "depth": 2, "num_heads": 2}', "--metric", "knn_top1=12.5"]) == 0
    assert (out / "model.safetensors").read_bytes() == (dino_tiny["dir"] / "model.safetensors").read_bytes()
    assert "| knn_top1 | 12.5 |" in (out / "README.md").read_text()
    capsys.readouterr()

    assert main(["publish", str(out), "--repo", "adclr-test/cli", "--name", "adclr_vit_small.cli",
                 "--metric", "knn_top1=12.5"]) == 0
    printed = capsys.readouterr().out
    entry = parse_manifest(printed.replace(REVISION_PLACEHOLDER, "d" * 40), "cli")["adclr_vit_small.cli"]
    assert entry.metrics == {"knn_top1": 12.5} and entry.size_bytes == (out / "model.safetensors").stat().st_size


def test_cli_convert_reports_user_errors(dino_tiny, tmp_path, capsys):
    from adclr.cli import main

    code = main(["convert", str(dino_tiny["ckpt"]), "--arch", "adclr_vit_small", "--out", str(tmp_path / "o"),
                 "--key", "ema", "--model-args", '{"embed_dim": 64, "depth": 2, "num_heads": 2}'])
    assert code == 2 and "adclr convert: error: the training checkpoint has no network 'ema'" in capsys.readouterr().err


def test_cli_verify_exit_codes(three_entry_manifest, capsys):
    from adclr.cli import main

    assert main(["verify"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["ok", "adclr_vit_mini_patch8.demo"],
        ["ok", "adclr_vit_tiny.good"], ["mismatch", "adclr_vit_tiny.wrong"], ["missing", "adclr_vit_tiny.absent"]]
    assert lines[-1] == "4 checked, 2 ok, 2 failed"
    assert main(["verify", "adclr_vit_tiny.good"]) == 0
    assert main(["verify", "adclr_vit_tiny.nope"]) == 2


def test_default_entry_name_comes_from_the_exported_adclr_arch(tmp_path):
    """adclr_vit_mini_patch8 exports as timm's vit_tiny_patch16_224 family; its entry must still name the mini arch."""
    model = timm.create_model("adclr_vit_mini_patch8", depth=1)
    export_model(model, tmp_path / "mini")
    entry_text = publish(tmp_path / "mini", "adclr-test/mini", revision="c" * 40)
    entry = parse_manifest(entry_text, "mini")["adclr_vit_mini_patch8.mini"]
    assert entry.arch == "adclr_vit_mini_patch8"
