"""The training step on this machine: posetune's step against the previous one, side by side,
and the training loader's set-ups.

    python benchmarks/step.py [--frames 600] [--rounds 5] [--config configs/quick.yaml]

- baseline step: the single-process step as it was before the GPU work (kept here, the same
  in behaviour): `loss.item()` after every micro-batch (a device sync), label copies issued
  after the forward, the normalisation constants copied to the device for every batch
- posetune's step: `posetune.train.loop.train_one_epoch` (loss and finiteness stay on the device)
Both train the same model from the same weights on the same cached batches, one epoch each,
alternating for --rounds rounds; the median ratio is the figure. Then posetune's step is fed
by the training loader with 0 and 2 worker processes, from the cache and decoding PNGs.
Writes benchmarks/results/step.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from posetune.config import load_config
from posetune.data.loader import load_split, make_loader, to_model_input
from posetune.data.synth import generate
from posetune.train.loop import Step, train_one_epoch
from posetune.train.losses import get_orientation_loss, pose_loss
from posetune.train.model import create_model
from posetune.train.resume import TrainState
from posetune.train.runtime import Runtime, autocast_dtype, resolve_device

RESULTS = Path(__file__).parent / "results"


def baseline_epoch(model, loader, optimizer, loss_fn, rt: Runtime, cfg) -> float:
    """The previous training step (single process), as the baseline."""
    model.train()
    batches, accumulate = len(loader), cfg.train.accumulation_steps
    total = 0.0
    for i, (images, translations, quaternions) in enumerate(loader):
        group_start = i - i % accumulate
        group_size = min(accumulate, batches - group_start)
        with rt.autocast():
            x = to_model_input(images, rt.device, rt.normalize, rt.channels_last)  # constants per batch
            translation, quaternion = model(x)
        loss = pose_loss(
            translation,
            quaternion,
            translations.to(rt.device),  # blocking, after the forward
            quaternions.to(rt.device),
            cfg.train.beta_loss,
            loss_fn,
        )
        (loss / group_size).backward()
        value = loss.item()  # a device sync per micro-batch
        total += value
        if i - group_start == group_size - 1:
            if not math.isfinite(value):
                raise RuntimeError("diverged")
            if cfg.optimizer.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return total / batches


def setup(cfg, device):
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.dataset.symmetric).to(device).to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="configs/quick.yaml")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="posetune-step-"))
    try:
        generate(work / "data", {"train": args.frames, "val": 8}, seed=0)
        overrides = [f"dataset.root={work / 'data'}", f"dataset.cache_dir={work / 'cache'}", "dataset.num_workers=2"]
        cfg = load_config(args.config, overrides, environ={})
        device = resolve_device(cfg.device)
        rt = Runtime(device, amp_dtype=autocast_dtype(cfg.precision, device), normalize=cfg.dataset.normalize)
        loss_fn = get_orientation_loss(cfg.loss.orientation)
        batch = cfg.train.batch_size
        cached = load_split(cfg, "train")
        loader = make_loader(cached, batch, shuffle=True, seed=0, drop_last=True)
        images = len(loader) * batch
        scaler = torch.amp.GradScaler(device.type, enabled=False)

        old_model, old_optimizer = setup(cfg, device)
        new_model, new_optimizer = setup(cfg, device)

        def old() -> None:
            baseline_epoch(old_model, loader, old_optimizer, loss_fn, rt, cfg)

        new_step = Step(new_model, new_optimizer, scaler, loss_fn, rt, cfg, lambda s: cfg.optimizer.lr)

        def new(data=loader) -> None:
            train_one_epoch(new_step, data, TrainState())

        old(), new()  # warm-up: allocator, oneDNN kernels
        rounds = []
        for n in range(args.rounds):
            first, second = (old, new) if n % 2 == 0 else (new, old)  # alternate who goes first
            times = {first: timed(first), second: timed(second)}
            rounds.append({"baseline_img_s": images / times[old], "posetune_img_s": images / times[new]})
            rounds[-1]["ratio"] = rounds[-1]["posetune_img_s"] / rounds[-1]["baseline_img_s"]
            print(
                f"round {n + 1}: baseline {rounds[-1]['baseline_img_s']:.0f} img/s, "
                f"posetune {rounds[-1]['posetune_img_s']:.0f} img/s, ratio {rounds[-1]['ratio']:.3f}"
            )

        loaders = {}
        uncached_cfg = cfg.model_copy(deep=True)
        uncached_cfg.dataset.cache = False
        uncached = load_split(uncached_cfg, "train")
        for name, dataset in (("cached", cached), ("decoding PNGs", uncached)):
            for workers in (0, 2):
                data = make_loader(dataset, batch, shuffle=True, seed=0, drop_last=True, num_workers=workers)
                with contextlib.suppress(StopIteration):
                    next(iter(data))  # start the workers outside the timing (they persist)
                seconds = timed(lambda data=data: new(data))
                loaders[f"{name}, {workers} loader workers"] = images / seconds
                print(f"{name}, {workers} workers: {images / seconds:.0f} img/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = statistics.median(r["ratio"] for r in rounds)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device {device}",
        "config": args.config,
        "frames": args.frames,
        "rounds": rounds,
        "median_ratio": round(median, 3),
        "loaders_img_s": {k: round(v) for k, v in loaders.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        f"Training step, baseline (previous step) vs posetune's ({args.config}, {args.frames} frames, "
        f"{args.rounds} alternating rounds; {figures['machine']}):",
        "",
        "| round | baseline img/s | posetune img/s | ratio |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {n + 1} | {r['baseline_img_s']:.0f} | {r['posetune_img_s']:.0f} | {r['ratio']:.3f} |"
            for n, r in enumerate(rounds)
        ),
        "",
        f"Median posetune / baseline: **{median:.3f}x**.",
        "",
        "posetune's step fed by the training loader:",
        "",
        "| loader | images/s |",
        "| --- | ---: |",
        *(f"| {k} | {v:.0f} |" for k, v in loaders.items()),
        "",
    ]
    (RESULTS / "step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
