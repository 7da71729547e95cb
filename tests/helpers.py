"""Tiny search spaces for the Ray tests: each trial trains a few seconds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_space(tmp_path: Path, data: Path, name: str = "t", overrides: dict | None = None, **sections) -> Path:
    """A search-space file over `data` (96 train / 32 val frames): 96 samples per epoch.
    `overrides` adds base config overrides; `section__key=value` replaces a search-file key."""
    space = {
        "base": {
            "config": str(REPO / "configs" / "quick.yaml"),
            "overrides": {
                "dataset.root": str(data),
                "dataset.image_scale": "64x40",
                "dataset.cache_dir": str(tmp_path / "cache"),
                "dataset.num_workers": 0,
                "train.batch_size": 16,
                "val.eval_freq": 1,
            },
        },
        "parameters": {
            "optimizer.lr": {"distribution": "loguniform", "low": 1e-4, "high": 3e-3},
            "train.beta_loss": {"distribution": "uniform", "low": 0.5, "high": 2.0},
        },
        "search": {
            "num_samples": 4,
            "max_concurrent_trials": 1,
            "points_to_evaluate": [
                {"optimizer.lr": 3e-3, "train.beta_loss": 1.0},
                {"optimizer.lr": 1e-4, "train.beta_loss": 1.0},
            ],
            "asha": {"max_samples": 384, "grace_samples": 96, "reduction_factor": 2},
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.95, "local_cpus": 2},
        "storage": {"name": name, "path": str(tmp_path / "runs"), "keep_checkpoints": 2},
    }
    space["base"]["overrides"].update(overrides or {})
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        space[section][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def read_results(tmp_path: Path, name: str = "t") -> list[dict]:
    path = tmp_path / "runs" / name / "results.json"
    return json.loads(path.read_text())["trials"] if path.exists() else []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ray_processes() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if "raylet" in text or "gcs_server" in text:
            pids.append(process.pid)
    return pids


def kill_ray_leftovers() -> None:
    for pid in ray_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
