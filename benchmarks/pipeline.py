"""Input pipeline vs training step, and the synthetic generator, measured in one run.

    python benchmarks/pipeline.py [--frames 1000] [--config configs/quick.yaml]

Figures (images/s, on this machine, same settings for all):
- generator      `posetune data synth` at 650x400, all cores
- cold pipeline  PNG decode + crop + resize (dataset.cache=false) through the training loader
                 as `fit` builds it on this device (worker processes on a GPU, none on a CPU)
- cached         the same batches from the uint8 memory-mapped cache
- training step  forward + backward + optimizer step of the config's model, fed from the cache
Writes benchmarks/results/pipeline.{json,md}; the README quotes the .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from posetune.config import load_config
from posetune.data.loader import load_split, loader_workers, make_loader
from posetune.data.synth import generate
from posetune.train.loop import Step, train_one_epoch
from posetune.train.losses import get_orientation_loss
from posetune.train.model import create_model
from posetune.train.resume import TrainState
from posetune.train.runtime import Runtime, autocast_dtype, resolve_device

RESULTS = Path(__file__).parent / "results"


def images_per_second(loader, runtime: Runtime, epochs: int = 1) -> float:
    """Deliver every batch as model input (uint8 -> float, normalised, on the device)."""
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _, _ in loader:
            runtime.inputs(images)
            count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000, help="training frames to generate (default 1000)")
    parser.add_argument("--config", default="configs/quick.yaml")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="posetune-bench-"))
    try:
        start = time.perf_counter()
        generate(work / "data", {"train": args.frames, "val": 8}, seed=0)
        generator = (args.frames + 8) / (time.perf_counter() - start)

        overrides = [f"dataset.root={work / 'data'}", f"dataset.cache_dir={work / 'cache'}"]
        cfg = load_config(args.config, overrides, environ={})
        device = resolve_device(cfg.device)
        runtime = Runtime(device, amp_dtype=autocast_dtype(cfg.precision, device), normalize=cfg.dataset.normalize)
        batch = cfg.train.batch_size
        # The loaders exactly as `fit` builds its training loader on this device.
        workers, pin = loader_workers(cfg, device), device.type == "cuda"

        def training_loader(dataset):
            return make_loader(
                dataset, batch, shuffle=True, seed=0, drop_last=True, num_workers=workers, pin_memory=pin
            )

        cold_cfg = cfg.model_copy(deep=True)
        cold_cfg.dataset.cache = False
        cold = images_per_second(training_loader(load_split(cold_cfg, "train")), runtime)

        start = time.perf_counter()
        cached_set = load_split(cfg, "train")  # builds the cache
        cache_build = len(cached_set) / (time.perf_counter() - start)
        cached_loader = training_loader(cached_set)
        cached = images_per_second(cached_loader, runtime, epochs=3)

        torch.manual_seed(0)
        model = create_model(cfg.model, cfg.dataset.symmetric).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
        loss_fn = get_orientation_loss(cfg.loss.orientation)

        step = Step(model, optimizer, scaler, loss_fn, runtime, cfg, lambda step: cfg.optimizer.lr)

        def one_epoch() -> None:
            train_one_epoch(step, cached_loader, TrainState())

        one_epoch()  # warm-up: allocator, oneDNN kernels
        start = time.perf_counter()
        one_epoch()
        train_step = len(cached_loader) * batch / (time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device {device}",
        "config": args.config,
        "frames": args.frames,
        "generator_img_s": round(generator),
        "cold_pipeline_img_s": round(cold),
        "cache_build_img_s": round(cache_build),
        "cached_pipeline_img_s": round(cached),
        "train_step_img_s": round(train_step),
        "cached_over_train_step": round(cached / train_step, 1),
        "cold_over_train_step": round(cold / train_step, 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(figures, indent=2) + "\n")
    table = "\n".join(
        [
            f"Input pipeline vs training step ({args.config}, {args.frames} frames; {figures['machine']}):",
            "",
            "| what | images/s |",
            "| --- | ---: |",
            f"| synthetic generator, 650x400 PNG, all cores | {figures['generator_img_s']} |",
            f"| cold pipeline: PNG decode + crop + resize, {workers} loader workers (as training uses) "
            f"| {figures['cold_pipeline_img_s']} |",
            f"| cached pipeline: uint8 memory map, {workers} loader workers | {figures['cached_pipeline_img_s']} |",
            f"| training step (forward + backward + Adam) | {figures['train_step_img_s']} |",
            "",
            f"Cached pipeline / training step: **{figures['cached_over_train_step']}x** "
            f"(cold: {figures['cold_over_train_step']}x).",
        ]
    )
    (RESULTS / "pipeline.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
