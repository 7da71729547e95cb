"""Datasets in a bucket (a real GCS emulator): pushed, fetched once per node, trained on."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading

import pytest

from posetune.config import load_config
from posetune.data.fetch import fetch_dataset
from posetune.data.loader import load_split
from posetune.data.tools import push_dataset
from posetune.errors import DataError, StorageError

FETCH_MESSAGE = "fetching gs://"


def fetches(caplog) -> int:
    return sum(FETCH_MESSAGE in record.getMessage() for record in caplog.records)


def test_push_then_fetch_once_per_node_and_again_after_a_change(gcs, bucket, synth_small, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="posetune.data.fetch")
    indexes, sent = push_dataset(str(synth_small), f"gs://{bucket}/synth")
    assert set(indexes) == {"train", "val", "test"} and len(indexes["train"]) == 96 and sent > 0
    names = gcs.names(bucket)
    assert any(n.startswith("synth/train/") for n in names) and any(n.endswith(".json") for n in names)

    cache = tmp_path / "cache"
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_dataset(f"gs://{bucket}/synth", cache))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fetches(caplog) == 1 and len(set(results)) == 1  # four concurrent users, one download
    local = results[0]
    assert (local / "train").is_dir() and (local / "val").is_dir()
    assert fetch_dataset(f"gs://{bucket}/synth", cache) == local and fetches(caplog) == 1  # unchanged

    # A changed object (a relabelled capture file) is fetched again, into a new version.
    blob = next(b for b in gcs.client.list_blobs(bucket, prefix="synth/val/") if b.name.endswith(".json"))
    blob.upload_from_string(blob.download_as_bytes())
    again = fetch_dataset(f"gs://{bucket}/synth", cache)
    assert fetches(caplog) == 2 and again != local and (again / "val").is_dir()

    # Training reads it through the same path: dataset.root is the bucket.
    cfg = load_config(
        overrides=[f"dataset.root=gs://{bucket}/synth", f"dataset.cache_dir={cache}", "dataset.image_scale=64x40"],
        environ={},
    )
    assert len(load_split(cfg, "train")) == 96 and fetches(caplog) == 2


def test_zipped_dataset_in_a_bucket(gcs, bucket, synth_small, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="posetune.data.fetch")
    push_dataset(str(synth_small), f"gs://{bucket}/synth.zip")
    assert gcs.names(bucket) == ["synth.zip"]
    local = fetch_dataset(f"gs://{bucket}/synth.zip", tmp_path)
    assert local.name == "synth.zip" and local.is_file()
    assert fetch_dataset(f"gs://{bucket}/synth.zip", tmp_path) == local and fetches(caplog) == 1
    root = f"gs://{bucket}/synth.zip"
    cfg = load_config(
        overrides=[f"dataset.root={root}", f"dataset.cache_dir={tmp_path}", "dataset.image_scale=64x40"], environ={}
    )
    assert len(load_split(cfg, "val")) == 32
    with pytest.raises(DataError, match=f"dataset.root gs://{bucket}/other.zip does not exist"):
        fetch_dataset(f"gs://{bucket}/other.zip", tmp_path)


def test_push_validates_before_uploading_anything(gcs, bucket, synth_small, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth_small, broken)
    next((broken / "val").rglob("captures_*.json")).write_text("{ not json")
    with pytest.raises(DataError, match="captures_"):
        push_dataset(str(broken), f"gs://{bucket}/broken")
    assert gcs.names(bucket) == []
    push_dataset(str(synth_small), f"gs://{bucket}/d")
    with pytest.raises(StorageError, match="already exists; pass --overwrite"):
        push_dataset(str(synth_small), f"gs://{bucket}/d")


def test_cli_push_check_and_synth_to_a_bucket(gcs, bucket, synth_small, tmp_path):
    def posetune(*args):
        return subprocess.run([sys.executable, "-m", "posetune", *args], capture_output=True, text=True, cwd=tmp_path)

    pushed = posetune("data", "push", str(synth_small), f"gs://{bucket}/pushed")
    assert pushed.returncode == 0, pushed.stderr
    assert f"-> gs://{bucket}/pushed" in pushed.stdout and "train 96, val 32, test 16 samples" in pushed.stdout
    checked = posetune("data", "check", f"gs://{bucket}/pushed", "--splits", "train", "val", "test")
    assert checked.returncode == 0, checked.stderr
    assert [line.split()[:3] for line in checked.stdout.splitlines()[2:]] == [
        ["train", "legacy", "96"],
        ["val", "legacy", "32"],
        ["test", "legacy", "16"],
    ]
    made = posetune("data", "synth", f"gs://{bucket}/made", "--train", "8", "--val", "4", "--workers", "1")
    assert made.returncode == 0, made.stderr
    assert any(n.startswith("made/train/") for n in gcs.names(bucket)) and f"gs://{bucket}/made/val" in made.stdout
    again = posetune("data", "synth", f"gs://{bucket}/made", "--train", "8", "--val", "4")
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    missing = posetune("data", "push", str(tmp_path / "nope"), f"gs://{bucket}/x")
    assert missing.returncode == 2 and "is not a dataset folder" in missing.stderr and "Traceback" not in missing.stderr
