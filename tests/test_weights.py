"""Verified downloads against a real Hub-compatible server (olah on 127.0.0.1), no internet."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adclr import weights
from adclr.manifest import WeightsEntry
from conftest import run_python


def _entry(repo_id: str, revision: str, info: dict, sha256: str | None = None, name="adclr_vit_tiny.test"):
    return WeightsEntry(name=name, hf_hub_id=repo_id, revision=revision, filename="model.safetensors",
                        sha256=sha256 or info["sha256"], size_bytes=info["size_bytes"], license="apache-2.0")


def _publish(local_hub, exported_tiny, repo_id: str) -> str:
    d = exported_tiny["dir"]
    return local_hub.add_repo(repo_id, {n: d / n for n in ("model.safetensors", "config.json", "README.md")})


def _manifest(path: Path, entries: list[WeightsEntry]) -> Path:
    lines = []
    for e in entries:
        lines += [f'["{e.name}"]', f'hf_hub_id = "{e.hf_hub_id}"', f'revision = "{e.revision}"',
                  f'filename = "{e.filename}"', f'sha256 = "{e.sha256}"', f"size_bytes = {e.size_bytes}",
                  f'license = "{e.license}"', ""]
    path.write_text("\n".join(lines))
    return path


def test_download_verify_load_gives_exported_tensors(local_hub, exported_tiny, tmp_path):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-ok")
    entry = _entry("adclr-test/tiny-ok", rev, exported_tiny)
    manifest = _manifest(tmp_path / "weights.toml", [entry])
    out = tmp_path / "loaded.safetensors"
    code = f"""
import timm, adclr
from safetensors.torch import save_file
m = timm.create_model('adclr_vit_tiny.test', pretrained=True, depth=1)
assert type(m) is timm.models.VisionTransformer
save_file(m.state_dict(), {str(out)!r})
"""
    result = run_python(code, env={"ADCLR_WEIGHTS_MANIFEST": str(manifest)})
    assert result.returncode == 0, result.stderr
    loaded = load_file(out)
    assert loaded.keys() == exported_tiny["tensors"].keys()
    for k, v in exported_tiny["tensors"].items():
        assert torch.equal(loaded[k], v), k


def test_verified_blob_is_hashed_once(local_hub, exported_tiny, monkeypatch):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-once")
    entry = _entry("adclr-test/tiny-once", rev, exported_tiny)
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    first = weights.download_verified(entry)
    second = weights.download_verified(entry)
    assert first == second and len(calls) == 1


def test_same_size_corrupted_cached_blob_is_replaced(local_hub, exported_tiny, caplog):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-corrupt")
    entry = _entry("adclr-test/tiny-corrupt", rev, exported_tiny)
    path = weights.download_verified(entry)
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])  # same size, different content
    blob.write_bytes(bytes(data))
    assert weights.sha256_file(blob) != entry.sha256

    again = weights.download_verified(entry)
    assert weights.sha256_file(again) == entry.sha256
    assert again.read_bytes() == Path(exported_tiny["path"]).read_bytes()
    assert "discarding the cached copy" in caplog.text


def test_corrupted_cached_blob_offline_is_weights_unavailable(local_hub, exported_tiny, tmp_path):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-corrupt-offline")
    entry = _entry("adclr-test/tiny-corrupt-offline", rev, exported_tiny)
    blob = weights.download_verified(entry).resolve()
    blob.write_bytes(bytes(255 - b for b in blob.read_bytes()))
    code = """
import timm, adclr
try:
    timm.create_model('adclr_vit_tiny.test', pretrained=True, depth=1)
except adclr.WeightsUnavailableError as e:
    print(e)
"""
    manifest = _manifest(tmp_path / "weights.toml", [entry])
    result = run_python(code, env={"ADCLR_WEIGHTS_MANIFEST": str(manifest), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "adclr-test/tiny-corrupt-offline" in result.stdout and "HF_HUB_OFFLINE=1" in result.stdout
    assert "discarding the cached copy" in result.stderr
    assert weights.cached_path(entry) is None


def test_file_that_never_matches_raises_with_both_hashes(local_hub, exported_tiny):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-wrong")
    expected = "0" * 64
    entry = _entry("adclr-test/tiny-wrong", rev, exported_tiny, sha256=expected)
    with pytest.raises(weights.ChecksumMismatchError) as err:
        weights.download_verified(entry)
    msg = str(err.value)
    assert expected in msg and exported_tiny["sha256"] in msg and "model.safetensors" in msg
    assert weights.cached_path(entry) is None  # the bad copy was not left in the cache


class _ConnectionCounter:
    """A TCP listener that only counts connection attempts (stands in for a Hub that must not be contacted)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()


#: Loads `adclr_vit_tiny.test` in a fresh interpreter; prints the seconds until WeightsUnavailableError, then the error.
_TIMED_LOAD = """
import time, timm, adclr
t = time.perf_counter()
try:
    timm.create_model('adclr_vit_tiny.test', pretrained=True)
except adclr.WeightsUnavailableError as e:
    print(f'{time.perf_counter() - t:.3f}')
    print(e)
"""


def test_offline_error_names_model_repo_and_ways_out_without_network(tmp_path):
    entry = WeightsEntry(name="adclr_vit_tiny.test", hf_hub_id="adclr-test/never-downloaded", revision="a" * 40,
                         filename="model.safetensors", sha256="b" * 64, size_bytes=10, license="apache-2.0")
    manifest = _manifest(tmp_path / "weights.toml", [entry])
    hub = _ConnectionCounter()
    result = run_python(_TIMED_LOAD, env={"ADCLR_WEIGHTS_MANIFEST": str(manifest), "HF_HUB_OFFLINE": "1",
                                          "HF_HOME": str(tmp_path / "empty_home"),
                                          "HF_ENDPOINT": f"http://127.0.0.1:{hub.port}"})
    assert result.returncode == 0, result.stderr
    print(result.stdout.splitlines()[0])  # how fast it comes, for the record (-s)
    msg = result.stdout
    for needle in ("adclr_vit_tiny.test", "adclr-test/never-downloaded", "HF_HUB_OFFLINE=1", "pretrained_cfg_overlay",
                   "hf download"):
        assert needle in msg
    assert hub.count == 0  # offline means no connection attempt, hence no retry back-off


def test_plain_timm_loads_hf_hub_repo_without_adclr(local_hub, exported_tiny):
    _publish(local_hub, exported_tiny, "adclr-test/tiny-plain")
    code = """
import sys, json, timm
m = timm.create_model('hf-hub:adclr-test/tiny-plain', pretrained=True)
assert 'adclr' not in sys.modules
print(json.dumps({k: float(v.double().sum()) for k, v in m.state_dict().items()}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    sums = json.loads(result.stdout.splitlines()[-1])
    assert sums.keys() == exported_tiny["tensors"].keys()
    for k, v in exported_tiny["tensors"].items():
        assert sums[k] == pytest.approx(float(v.double().sum()), rel=1e-12, abs=1e-12), k


def test_unknown_tag_lists_known_tags(local_hub, exported_tiny, tmp_path):
    entry = _entry("adclr-test/unused", "c" * 40, exported_tiny)
    manifest = _manifest(tmp_path / "weights.toml", [entry])
    code = """
import timm, adclr
try:
    timm.create_model('adclr_vit_tiny.nosuchtag', pretrained=True)
except RuntimeError as e:
    print(e)
"""
    result = run_python(code, env={"ADCLR_WEIGHTS_MANIFEST": str(manifest)})
    assert "Unknown pretrained tag 'nosuchtag' for adclr_vit_tiny; known tags: test" in result.stdout, result.stderr


def test_models_command_reports_cached(local_hub, exported_tiny, tmp_path):
    rev = _publish(local_hub, exported_tiny, "adclr-test/tiny-listed")
    entry = _entry("adclr-test/tiny-listed", rev, exported_tiny)
    manifest = _manifest(tmp_path / "weights.toml", [entry])
    env = {"ADCLR_WEIGHTS_MANIFEST": str(manifest), "HF_HOME": str(tmp_path / "home")}
    listing = "from adclr.cli import main; main(['models'])"
    before = run_python(listing, env=env).stdout
    run_python("import adclr, timm; timm.create_model('adclr_vit_tiny', pretrained=True, depth=1)", env=env)
    after = run_python(listing, env=env).stdout
    row = lambda text: next(line for line in text.splitlines() if "adclr-test/tiny-listed" in line).split()
    assert row(before)[:2] == ["adclr_vit_tiny", "test"] and row(before)[-1] == "no"
    assert row(after)[-1] == "yes"
    assert "(no published weights)" in after  # small and base have none




def _unreachable_entry(tmp_path) -> Path:
    entry = WeightsEntry(name="adclr_vit_tiny.test", hf_hub_id="adclr-test/never-reached", revision="a" * 40,
                         filename="model.safetensors", sha256="b" * 64, size_bytes=10, license="apache-2.0")
    return _manifest(tmp_path / "weights.toml", [entry])


def test_unreachable_hub_fails_fast_with_the_named_error(tmp_path):
    with socket.socket() as closed:  # a port that refuses connections
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {"ADCLR_WEIGHTS_MANIFEST": str(_unreachable_entry(tmp_path)), "HF_HOME": str(tmp_path / "home"),
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    result = run_python(_TIMED_LOAD, env=env)
    assert result.returncode == 0, result.stderr
    elapsed, message = result.stdout.split("\n", 1)
    assert float(elapsed) < 5, elapsed
    assert "adclr-test/never-reached" in message and "is unreachable" in message and "ADCLR_HUB_TIMEOUT" in message


def test_silent_hub_waits_as_long_as_adclr_hub_timeout(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        env = {"ADCLR_WEIGHTS_MANIFEST": str(_unreachable_entry(tmp_path)), "HF_HOME": str(tmp_path / "home"),
               "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "ADCLR_HUB_TIMEOUT": "0.5"}
        result = run_python(_TIMED_LOAD, env=env)
    assert result.returncode == 0, result.stderr
    elapsed, message = result.stdout.split("\n", 1)
    assert float(elapsed) < 5, elapsed
    assert "is unreachable" in message
