"""Shared fixtures. A real Hub-compatible server (olah, offline mode) on 127.0.0.1 serves git repos built here.

huggingface_hub reads HF_ENDPOINT / HF_HOME when first imported, so they are set at the top of this file, before any
test module imports adclr (and with it huggingface_hub).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SESSION_DIR = Path(tempfile.mkdtemp(prefix="adclr-tests-"))
HUB_PORT = _free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_ENDPOINT"] = HUB_ENDPOINT
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("ADCLR_WEIGHTS_MANIFEST", None)


class LocalHub:
    """olah serving `mirrors/models/ORG/NAME` git repos; `add_repo` commits files and returns the commit id."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.endpoint = f"http://127.0.0.1:{port}"
        self.mirrors = root / "mirrors"
        self.config = root / "olah.toml"
        self.mirrors.mkdir(parents=True)
        (root / "repos").mkdir()
        self.config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n\n[accessibility]\noffline = true\n')
        self.process: subprocess.Popen | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path]) -> str:
        path = self.mirrors / "models" / repo_id
        path.mkdir(parents=True)
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            (path / name).write_bytes(data)
        git = ["git", "-C", str(path), "-c", "user.name=adclr-tests", "-c", "user.email=tests@adclr.invalid"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-qm", "weights"], check=True)
        return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    def start(self) -> None:
        self.add_repo("probe/ready", {"model.safetensors": b"{}", "README.md": b"probe"})
        olah = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
        log = open(self.root / "olah.log", "wb")
        self.process = subprocess.Popen([olah, "-c", str(self.config)], cwd=self.root, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited early; see {self.root / 'olah.log'}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/api/models/probe/ready/revision/main", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"olah did not become ready in 60 s; see {self.root / 'olah.log'}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)


def pytest_sessionfinish(session, exitstatus):
    """The session's Hub cache and git repos (about 70 MB) go with it; pytest's own tmp_path folders are kept as
    pytest keeps them (the last three sessions)."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Transforms run single-threaded, as in DataLoader workers; threads only add overhead on tiny images."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def local_hub():
    hub = LocalHub(_SESSION_DIR / "hub", HUB_PORT)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory):
    """A depth-1 adclr_vit_tiny exported with the project's own code, and its exact tensors."""
    import timm
    import torch
    from safetensors.torch import load_file

    import adclr  # noqa: F401  registers the architectures
    from adclr.export import export_model

    torch.manual_seed(0)
    model = timm.create_model("adclr_vit_tiny", depth=1)
    out = tmp_path_factory.mktemp("exported_tiny")
    info = export_model(model, out, name="adclr_vit_tiny test export")
    return {"dir": out, **info, "tensors": load_file(out / "model.safetensors")}


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (so env vars are read at first import, as for a user)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout)
