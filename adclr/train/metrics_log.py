"""metrics.jsonl: one JSON record per logged step and per epoch, appended by the main process.

A resumed run repeats everything after its checkpoint, so before it starts the file is cut back to the records of the
epochs the checkpoint holds; otherwise the steps between the checkpoint and the interruption would appear twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


def append_record(folder: Path, record: dict) -> None:
    with open(folder / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_completed_epochs(folder: Path, epochs_done: int) -> None:
    """Keep the step records of epochs before `epochs_done` and their summaries; drop the rest (and a half line)."""
    path = folder / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line a kill cut short
        ends_with_epoch = record["epoch_end"] if "epoch_end" in record else record["epoch"] + 1
        if ends_with_epoch <= epochs_done:
            kept.append(line + "\n")
    tmp = path.with_name(f".{METRICS_NAME}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
