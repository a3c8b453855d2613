"""Plumbing shared by the benchmark scripts: machine description, one measurement per fresh process, medians, tables.

Every measurement runs in its own Python process (the script re-runs itself with ``--worker SPEC``), so a peak-memory
figure belongs to that configuration alone and no allocator state carries over from the one before.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

MIB = 2 ** 20

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated (tensor memory) in a fresh process per configuration; 'total' = peak "
            "during the timed repeats (weights, optimizer state if any, activations), 'work' = that peak minus the "
            "allocation just before the timed repeats (what the forward/step itself adds).",
    "cpu": "peak RSS (VmHWM of /proc/self/status) in a fresh process per configuration; after warm-up the heap is "
           "trimmed (malloc_trim) and VmHWM reset (echo 5 > /proc/self/clear_refs), so the peak is that of the timed "
           "repeats; 'total' = that peak minus the RSS right after the imports (weights, optimizer state if "
           "any, activations; not the libraries), 'work' = that peak minus the RSS just before the timed repeats.",
}


def machine_info(device: str) -> dict[str, Any]:
    """What a reader needs to compare figures between runs: CPU model, cores, threads, library versions, GPU."""
    import timm

    cpu_model = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def print_machine_info(info: dict[str, Any]) -> None:
    print("machine:")
    for key, value in info.items():
        print(f"  {key:16s} {value}")
    print(f"memory method: {MEMORY_METHOD[info['device']]}")
    print()


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; run with --device cpu or on a GPU machine.")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device!r} is not supported; use cpu or cuda.")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}; the CPU memory figures need Linux.")


class PeakMemory:
    """Peak memory of the work done after `reset()`, against the level when the object was made (after the imports).

    Create it right after the imports, build the workload, warm up, call `reset()`, run the timed repeats, then
    `report()`. See MEMORY_METHOD for what the two figures mean on each device.
    """

    def __init__(self, device: str):
        self.device = device
        self.start = self._current()
        self.before = self.start

    def _current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS is live memory only
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        self.before = self._current()

    def report(self) -> dict[str, float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        return {"total_mib": (peak - self.start) / MIB, "work_mib": (peak - self.before) / MIB}


def measure(fn: Callable[[], Any], device: str, memory: PeakMemory, warmup: int, repeats: int) -> dict[str, Any]:
    """Seconds per call of `fn` (median over `repeats` after `warmup` calls) and the peak memory of the timed calls."""
    if repeats < 1 or warmup < 0:
        raise SystemExit(f"need --repeats >= 1 and --warmup >= 0, got {repeats} and {warmup}.")
    for _ in range(warmup):
        fn()
    memory.reset()
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "seconds": seconds, **memory.report()}


def run_worker(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `script --worker SPEC` in a fresh interpreter; it writes its figures as JSON to spec['result']."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, result=str(Path(tmp) / "result.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        if spec["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the engine picks CUDA whenever it sees one
        done = subprocess.run([sys.executable, script, "--worker", str(spec_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            raise SystemExit(f"worker for {spec.get('label', spec)} failed (exit {done.returncode}):\n{done.stdout}")
        return json.loads(Path(spec["result"]).read_text())


def read_spec(path: str) -> dict[str, Any]:
    spec = json.loads(Path(path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return spec


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    Path(spec["result"]).write_text(json.dumps(result))


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is not positive (a memory delta can be 0 at page granularity)."""
    return a / b if b > 0 else float("nan")


def _cell(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    if value != 0 and abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"\nfigures written to {path}")


def start(device: str, threads: int | None) -> dict[str, Any]:
    """Check the device, pin the thread count, print and return the machine info: every benchmark's preamble."""
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    info = machine_info(device)
    print_machine_info(info)
    return info


@contextlib.contextmanager
def tee_stdout(path: str | Path):
    """Print as usual and also write everything printed to `path`: the text twin of a benchmark's JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as text:

        class Tee:
            def write(self, data: str) -> int:
                text.write(data)
                return sys.__stdout__.write(data)

            def flush(self) -> None:
                text.flush()
                sys.__stdout__.flush()

        with contextlib.redirect_stdout(Tee()):
            yield
