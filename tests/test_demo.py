"""The embedded demo model: loads offline, matches its manifest hash, keeps its recorded figures on the bundled checks
and beats random init of its arch by a clear margin."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import adclr
from adclr.evaluate import bundled_items_knn, bundled_scenes_probe
from adclr.features import DEMO_MODEL
from adclr.weights import fetch_verified, sha256_file
from conftest import run_python

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
#: Points: the checks are seeded and run on the CPU; the tolerance absorbs float differences between CPUs and BLAS
#: builds (a k-NN point is two of the 200 scored items).
TOLERANCE = 1.0
#: k-NN points by which the demo model must beat a random-init model of its arch on the bundled items (random init
#: scores 34.5 / 36.5 / 38.5 there with seeds 0 / 1 / 2).
KNN_MARGIN = 10.0
#: Foreground-IoU points by which it must beat that model on the bundled scenes' dense probe (items apart from the
#: background in its patch features).
FG_IOU_MARGIN = 5.0


def test_demo_model_is_embedded_and_verified():
    entry = adclr.models.MANIFEST[DEMO_MODEL]
    assert entry.embedded and entry.license == "apache-2.0"
    path = fetch_verified(entry)
    assert sha256_file(path) == entry.sha256 and path.stat().st_size == entry.size_bytes
    model = timm.create_model(DEMO_MODEL, pretrained=True)
    stored = load_file(path)
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in stored.items())


def test_demo_probe_reaches_the_recorded_figure():
    recorded = adclr.models.MANIFEST[DEMO_MODEL].metrics["bundled_probe_miou"]
    assert f"{recorded:.2f}" in RESULTS.read_text()  # the manifest and RESULTS.md state the same figure
    model = timm.create_model(DEMO_MODEL, pretrained=True)
    assert bundled_scenes_probe(model)["miou"] >= recorded - TOLERANCE


def test_demo_model_beats_random_init_of_its_arch():
    model = timm.create_model(DEMO_MODEL, pretrained=True)
    torch.manual_seed(0)
    random_model = timm.create_model(DEMO_MODEL.rsplit(".", 1)[0])
    demo, random_init = (bundled_items_knn(m)["top1"] for m in (model, random_model))
    demo_fg, random_fg = (bundled_scenes_probe(m)["fg_iou"] for m in (model, random_model))
    recorded = adclr.models.MANIFEST[DEMO_MODEL].metrics
    assert demo == pytest.approx(recorded["bundled_items_knn"], abs=TOLERANCE)
    assert random_init == pytest.approx(recorded["random_init_bundled_items_knn"], abs=TOLERANCE)
    assert random_fg == pytest.approx(recorded["random_init_bundled_probe_fg_iou"], abs=TOLERANCE)
    assert demo >= random_init + KNN_MARGIN
    assert demo_fg >= random_fg + FG_IOU_MARGIN


def test_demo_command_runs_offline(tmp_path):
    result = run_python(f"from adclr.cli import main; raise SystemExit(main(['demo', '--out', {str(tmp_path)!r}]))",
                        env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "overview.png").is_file() and (tmp_path / "report.md").is_file()
    report = (tmp_path / "report.md").read_text()
    assert DEMO_MODEL in report
    knn = adclr.models.MANIFEST[DEMO_MODEL].metrics["bundled_items_knn"]
    assert f"| items k-NN top-1 (800 / 200 bundled items) | {knn:.2f} |" in report
