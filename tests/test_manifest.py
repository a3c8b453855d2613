"""Manifest schema: every malformed entry fails with its file, entry and field named."""
from __future__ import annotations

import pytest

from adclr.manifest import ManifestError, parse_manifest, packaged_manifest_text
from conftest import run_python

ENTRY = """
["adclr_vit_small.in1k"]
hf_hub_id = "org/adclr-vit-small"
revision = "0123456789abcdef0123456789abcdef01234567"
filename = "model.safetensors"
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
size_bytes = 88231616
license = "apache-2.0"
description = "ViT-S/16"
"""
GOOD = ENTRY + """
["adclr_vit_small.in1k".metrics]
knn = 70.1
"""


def test_good_manifest_parses():
    entry = parse_manifest(GOOD, "x.toml")["adclr_vit_small.in1k"]
    assert (entry.arch, entry.tag, entry.size_bytes, entry.metrics["knn"]) == (
        "adclr_vit_small", "in1k", 88231616, 70.1)


def test_packaged_manifest_is_valid():
    parse_manifest(packaged_manifest_text(), "packaged")


@pytest.mark.parametrize("old, new, message", [
    ('revision = "0123456789abcdef0123456789abcdef01234567"', 'revision = "main"',
     "field 'revision' must be a full 40-hex"),
    ('sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"', 'sha256 = "abc"', "field 'sha256'"),
    ("size_bytes = 88231616", 'size_bytes = "big"', "field 'size_bytes' must be int"),
    ("size_bytes = 88231616", "size_bytes = 0", "'size_bytes' must be positive"),
    ('license = "apache-2.0"\n', "", "missing required field 'license'"),
    ('hf_hub_id = "org/adclr-vit-small"', 'hf_hub_id = "no-slash"', "field 'hf_hub_id' must be 'ORG/NAME'"),
    ('description = "ViT-S/16"', 'descripton = "typo"', "unknown field(s) ['descripton']"),
    ('["adclr_vit_small.in1k"]', '["adclr_vit_small"]', "must be 'arch.tag'"),
])
def test_bad_entries_are_named(old, new, message):
    text = ENTRY.replace(old, new)
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, "team.toml")
    assert "team.toml" in str(err.value) and "adclr_vit_small" in str(err.value) and message in str(err.value)


def test_bad_toml_syntax():
    with pytest.raises(ManifestError, match="team.toml: not valid TOML"):
        parse_manifest("[unclosed", "team.toml")


def test_env_override_is_validated_at_import(tmp_path):
    bad = tmp_path / "team.toml"
    bad.write_text(GOOD.replace('sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"',
                                'sha256 = "nothex"'))
    result = run_python("import adclr", env={"ADCLR_WEIGHTS_MANIFEST": str(bad)})
    assert result.returncode != 0
    assert "ManifestError" in result.stderr and str(bad) in result.stderr and "adclr_vit_small.in1k" in result.stderr
    missing = run_python("import adclr", env={"ADCLR_WEIGHTS_MANIFEST": str(tmp_path / "nope.toml")})
    assert "does not name a readable file" in missing.stderr


def test_embedded_entries_and_source_rules():
    embedded = ENTRY.replace('hf_hub_id = "org/adclr-vit-small"\n'
                             'revision = "0123456789abcdef0123456789abcdef01234567"\n'
                             'filename = "model.safetensors"\n', 'file = "assets/demo.safetensors"\n')
    entry = parse_manifest(embedded, "x.toml")["adclr_vit_small.in1k"]
    assert entry.embedded and entry.file == "assets/demo.safetensors" and entry.hf_hub_id == ""
    both = ENTRY.replace('license = "apache-2.0"', 'license = "apache-2.0"\nfile = "assets/demo.safetensors"')
    with pytest.raises(ManifestError, match="either 'file'.*not both"):
        parse_manifest(both, "x.toml")
    no_revision = ENTRY.replace('revision = "0123456789abcdef0123456789abcdef01234567"\n', "")
    with pytest.raises(ManifestError, match=r"missing required field\(s\) \['revision'\]"):
        parse_manifest(no_revision, "x.toml")
