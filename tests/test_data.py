import multiprocessing
import os

import numpy as np
import torch

from posetune.config import load_config
from posetune.data import cache
from posetune.data.cache import DecodedImages, cached_images
from posetune.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_split,
    make_loader,
    set_epoch,
    to_model_input,
)
from posetune.data.perception import read_split


def test_cache_is_built_once_and_matches_decoding(synth_small, tmp_path, monkeypatch):
    index = read_split(synth_small, "val", "cube_position")
    builds = []
    original = cache._build_cache
    monkeypatch.setattr(cache, "_build_cache", lambda *a: builds.append(a) or original(*a))
    first = cached_images(index, [195, 165, 455, 325], (64, 40), tmp_path)
    again = cached_images(index, [195, 165, 455, 325], (64, 40), tmp_path)
    assert len(builds) == 1 and first.shape == (32, 40, 64, 3) and isinstance(again, np.memmap)
    decoded = DecodedImages(index, [195, 165, 455, 325], (64, 40))
    assert np.array_equal(first[5], decoded[5]) and np.array_equal(again, first)
    # A different crop or size is a different cache, never a stale one.
    cached_images(index, None, (64, 40), tmp_path)
    cached_images(index, [195, 165, 455, 325], (32, 20), tmp_path)
    assert len(builds) == 3 and len(list(tmp_path.glob("*.npy"))) == 3


def test_changed_image_invalidates_the_cache(synth_small, tmp_path):
    import shutil

    shutil.copytree(synth_small / "val", tmp_path / "d" / "val")
    index = read_split(tmp_path / "d", "val", "cube_position")
    before = cached_images(index, None, (32, 20), tmp_path / "cache")
    image = tmp_path / "d" / "val" / index.images[0]
    os.utime(image, ns=(1, 1))  # same bytes, new mtime: rebuilt, to be safe
    after = cached_images(read_split(tmp_path / "d", "val", "cube_position"), None, (32, 20), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and np.array_equal(before, after)


def _build_in_child(args):
    root, cache_dir = args
    images = cached_images(read_split(root, "train", "cube_position"), None, (48, 30), cache_dir)
    return images.sum(dtype=np.int64)


def test_concurrent_builders_share_one_cache(synth_small, tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        sums = pool.map(_build_in_child, [(synth_small, tmp_path)] * 3)
    assert len(set(sums)) == 1
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".lock", ".npy"]  # no temp files left


def test_a_killed_builders_half_written_cache_is_removed(synth_small, tmp_path):
    """A builder killed mid-way leaves its .NAME.*.tmp behind; the next build removes it."""
    index = read_split(synth_small, "val", "cube_position")
    name = f"{cache.cache_key(index, None, (32, 20))}-{len(index)}x32x20.npy"
    leftover = tmp_path / f".{name}.deadbeef.tmp"
    leftover.write_bytes(b"half a cache")
    cached_images(index, None, (32, 20), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name.replace(".npy", ".lock")])


def test_cached_and_uncached_datasets_agree(synth_small, tmp_path):
    overrides = [f"dataset.root={synth_small}", "dataset.image_scale=48x30", f"dataset.cache_dir={tmp_path}"]
    cached = load_split(load_config(overrides=overrides, environ={}), "val")
    plain = load_split(load_config(overrides=[*overrides, "dataset.cache=false"], environ={}), "val")
    a, b = cached[[3, 1, 7]], plain[[1, 3, 7]]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[0].dtype == torch.uint8 and a[0].shape == (3, 30, 48, 3)


def test_evaluation_shards_cover_every_sample_once(synth_small, tmp_path):
    cfg = load_config(
        overrides=[f"dataset.root={synth_small}", "dataset.image_scale=32", f"dataset.cache_dir={tmp_path}"],
        environ={},
    )
    dataset = load_split(cfg, "val")
    seen = []
    for rank in range(3):
        for _, translations, _ in make_loader(dataset, 5, shuffle=False, seed=0, rank=rank, world_size=3):
            seen += [dataset.translations.tolist().index(t) for t in translations.tolist()]
    assert sorted(seen) == list(range(32))


def test_training_order_is_shuffled_per_epoch_and_reproducible(synth_small, tmp_path):
    cfg = load_config(
        overrides=[f"dataset.root={synth_small}", "dataset.image_scale=32", f"dataset.cache_dir={tmp_path}"],
        environ={},
    )
    dataset = load_split(cfg, "train")

    def order(epoch, rank=0, world_size=1):
        loader = make_loader(dataset, 8, shuffle=True, seed=4, rank=rank, world_size=world_size, drop_last=True)
        set_epoch(loader, epoch)
        return [t[0].item() for batch in loader for t in batch[1]]

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == sorted(dataset.translations[:, 0].tolist())  # 96 = 12 full batches
    halves = order(0, 0, 2) + order(0, 1, 2)
    assert sorted(halves) == sorted(order(0))  # two ranks split the epoch without overlap


def test_model_input_scaling_and_normalisation():
    images = torch.full((2, 4, 6, 3), 255, dtype=torch.uint8)
    x = to_model_input(images, torch.device("cpu"), "imagenet", channels_last=True)
    assert x.shape == (2, 3, 4, 6) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected)
    raw = to_model_input(images, torch.device("cpu"), "none", channels_last=False)
    assert torch.equal(raw, torch.ones(2, 3, 4, 6))
