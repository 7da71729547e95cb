"""Datasets in a bucket (a real GCS emulator): pushed, fetched once per node, trained on."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading

import pytest

from posetune import storage
from posetune.config import load_config
from posetune.data.fetch import fetch_dataset
from posetune.data.loader import load_split
from posetune.data.tools import push_dataset
from posetune.errors import DataError, StorageError

from helpers import FaultyGCS

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


@pytest.fixture
def front(gcs, monkeypatch):
    """posetune's gs:// calls go through helpers.FaultyGCS, a front of the emulator that
    counts and can delay or refuse requests; the tests' own `gcs.client` still goes direct."""
    proxy = FaultyGCS(gcs.host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    storage._instances.clear()
    yield proxy
    storage._instances.clear()  # the next client is made after the variable is restored
    proxy.close()


def fetch_in_another_process(uri: str, cache) -> str:
    """A trial on this node that fetched the dataset and has ended."""
    code = "import sys; from posetune.data.fetch import fetch_dataset; print(fetch_dataset(sys.argv[1], sys.argv[2]))"
    done = subprocess.run([sys.executable, "-c", code, uri, str(cache)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def rewrite(gcs, bucket: str, prefix: str, append: bytes = b"") -> str:
    """Rewrite the first capture file under prefix (a new generation; `append` changes its
    content, still valid JSON); returns its name."""
    blob = next(b for b in gcs.client.list_blobs(bucket, prefix=prefix) if "/captures_" in b.name)
    blob.upload_from_string(blob.download_as_bytes() + append)
    return blob.name


def test_a_changed_object_is_the_only_one_fetched_again(front, gcs, bucket, synth_small, tmp_path):
    """The docs' promise, object by object: a folder dataset downloads in parallel (the
    library's transfer_manager), a changed object is the one download of the next fetch, a
    superseded copy is removed once no process reads it and kept while one does."""
    uri, cache = f"gs://{bucket}/synth", tmp_path / "cache"
    push_dataset(str(synth_small), uri)
    objects = len(gcs.names(bucket, "synth/"))
    front.requests.clear()
    front.media_delay_s, front.max_in_flight = 0.05, 0
    first = fetch_in_another_process(uri, cache)
    assert len(front.media_downloads()) == objects
    assert front.max_in_flight >= 4, f"at most {front.max_in_flight} downloads at once"

    changed = rewrite(gcs, bucket, "synth/val/")
    front.requests.clear()
    second = fetch_dataset(uri, cache)
    assert [path.split("?")[0].rsplit("/o/", 1)[1] for path in front.media_downloads()] == [changed.replace("/", "%2F")]
    assert sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()) == sorted(
        [".complete"] + [n.removeprefix("synth/") for n in gcs.names(bucket, "synth/")]
    )
    assert not storage.LocalStorage.path(first).exists()  # the first copy's process has ended: removed
    manifest = json.loads((second / ".complete").read_text())["files"]
    assert manifest == storage.list_files(uri)

    # This process still reads the second copy: a third version leaves it (and removes a dead
    # fetch's scratch folder).
    (second.parent / ".dead.partial").mkdir()
    rewrite(gcs, bucket, "synth/train/")
    front.requests.clear()
    third = fetch_dataset(uri, cache)
    assert second.is_dir() and third != second and not (second.parent / ".dead.partial").exists()
    assert len(front.media_downloads()) == 1


def test_downloads_are_pinned_to_the_listed_generation(front, gcs, bucket, synth_small, tmp_path, monkeypatch, caplog):
    """An object rewritten between the listing and its download is not copied under the old
    listing's version (GCS refuses a generation that is gone; the fetch lists again); a
    dataset that keeps changing is one DataError."""
    caplog.set_level(logging.WARNING, logger="posetune.data.fetch")
    uri, cache = f"gs://{bucket}/synth", tmp_path / "cache"
    push_dataset(str(synth_small), uri)
    front.pin_generations = True
    listed = storage.list_files
    rewrites = {"left": 1}
    changed: list[str] = []

    def list_then_rewrite(where):
        files = listed(where)
        if rewrites["left"]:  # a `data push --overwrite` writes right after the listing
            rewrites["left"] -= 1
            changed.append(rewrite(gcs, bucket, "synth/val/", b"\n" * (len(changed) + 1)))
        return files

    monkeypatch.setattr(storage, "list_files", list_then_rewrite)
    local = fetch_dataset(uri, cache)
    assert "changed while it was fetched" in caplog.text
    new = gcs.client.bucket(bucket).blob(changed[0]).download_as_bytes()
    assert (local / changed[0].removeprefix("synth/")).read_bytes() == new  # the copy holds what it is keyed by
    manifest = json.loads((local / ".complete").read_text())["files"]
    assert manifest == listed(uri)
    front.requests.clear()
    assert fetch_dataset(uri, cache) == local and front.media_downloads() == []  # consistent: nothing to fetch

    rewrite(gcs, bucket, "synth/val/")  # the copy is out of date, and the object keeps changing after each listing
    rewrites["left"] = 99
    with pytest.raises(DataError, match=rf"dataset.root {uri} kept changing while it was fetched \(3 listings\)"):
        fetch_dataset(uri, cache)
