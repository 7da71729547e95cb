"""Training throughput on a GPU: images/s per GPU, share of the GPU's peak, memory, options.

    python benchmarks/gpu.py             # on a machine with a CUDA GPU (a clear skip elsewhere)
    python benchmarks/gpu.py --allow-cpu --quick   # smoke run of this script on a CPU (no figures kept)

For each setting it trains posetune's model with posetune's own step (`train_one_epoch`) on
synthetic frames and reports images/s:
- vgg16 at 224x224 (the reference setting), resnet50 at 224x224 and mobilenet_v3_small at
  128x80 (the search spaces' sizes);
- without the input pipeline (uint8 batches already on the GPU) and with it (the training
  DataLoader as `fit` builds it, from the decoded-image cache); their ratio is the share of
  the step the GPU is busy (goal >= 0.95: the pipeline is never the bottleneck);
- options one at a time against the default: fp32 instead of bf16 autocast, without
  channels_last, torch.compile (and its compile time), fused Adam.
FLOPs per image are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward +
backward pass (convolutions and matmuls); the share of peak (MFU) divides the achieved FLOP/s
by the GPU's dense bf16 peak from PEAK_TFLOPS (or --peak-tflops). Peak memory is
`torch.cuda.max_memory_allocated` per batch size. The reference setting's wall time is 120
epochs of 30,000 images at the measured vgg16 bf16 rate.
Writes benchmarks/results/gpu.json (headline) and gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import sys
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
from posetune.train.runtime import Runtime, autocast_dtype

RESULTS = Path(__file__).parent / "results"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}
SETTINGS = [  # (name, backbone, image_scale, batch)
    ("vgg16_224", "vgg16", "224", 64),
    ("resnet50_224", "resnet50", "224", 64),
    ("mobilenet_v3_small_128x80", "mobilenet_v3_small", "128x80", 128),
]
REFERENCE_IMAGES = 120 * 30_000  # the tutorial: 120 epochs of 30,000 frames


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def config(data: Path, cache: Path, backbone: str, scale: str, batch: int, precision: str, *extra: str):
    overrides = [
        f"dataset.root={data}",
        f"dataset.cache_dir={cache}",
        f"dataset.image_scale={scale}",
        f"model.backbone={backbone}",
        f"train.batch_size={batch}",
        "train.accumulation_steps=1",
        f"precision={precision}",
        *extra,
    ]
    return load_config(overrides=overrides, environ={})


def flops_per_image(cfg, rt: Runtime) -> float:
    """Forward + backward FLOPs of one batch, per image (torch's own counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(cfg.model).to(rt.device)
    images = torch.randint(0, 255, (2, *reversed(cfg.dataset.image_size), 3), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with counter:
        translation, quaternion = model(rt.inputs(images))
        (translation.sum() + quaternion.sum()).backward()
    return counter.get_total_flops() / 2


def measure(cfg, rt: Runtime, dataset, steps: int, pipeline: bool) -> tuple[float, float]:
    """(images/s, seconds of the first step, which includes any compile) of posetune's step."""
    torch.manual_seed(0)
    model = create_model(cfg.model).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = True if cfg.optimizer.fused and rt.device.type == "cuda" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
    compiled = torch.compile(model) if cfg.train.compile else None
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    loss_fn = get_orientation_loss(cfg.loss.orientation)
    step = Step(model, optimizer, scaler, loss_fn, rt, cfg, lambda s: 1e-4, compiled)
    batch = cfg.train.batch_size
    if pipeline:
        loader = make_loader(
            dataset,
            batch,
            shuffle=True,
            seed=0,
            drop_last=True,
            num_workers=loader_workers(cfg, rt.device),
            pin_memory=rt.device.type == "cuda",
        )
    else:  # the same batch, already on the device, every step: the step alone
        images, translations, quaternions = dataset[list(range(batch))]
        loader = [(images.to(rt.device), translations.to(rt.device), quaternions.to(rt.device))]

    def epoch(limit: int) -> int:
        batches = Steps(loader, limit)  # drawn from the loader while training, as in fit
        train_one_epoch(step, batches, TrainState())
        return limit * batch

    _sync(rt)
    start = time.perf_counter()
    epoch(1)  # first step: compile, cuDNN autotuning, allocator
    _sync(rt)
    first = time.perf_counter() - start
    epoch(min(5, steps))  # warm-up
    _sync(rt)
    start = time.perf_counter()
    seen = epoch(steps)
    _sync(rt)
    return seen / (time.perf_counter() - start), first


class Steps:
    """`limit` batches from a loader, cycling through its epochs, drawn lazily."""

    def __init__(self, loader, limit: int):
        self.loader, self.limit = loader, limit

    def __len__(self) -> int:
        return self.limit

    def __iter__(self):
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.loader)), self.limit)


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(cfg, rt: Runtime, dataset, batches: list[int]) -> dict[int, float]:
    """GiB allocated at peak for one step at each batch size (None where it does not fit)."""
    result = {}
    for batch in batches:
        if rt.device.type != "cuda":
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        sized = cfg.model_copy(deep=True)
        sized.train.batch_size = batch
        try:
            measure(sized, rt, dataset, steps=1, pipeline=False)
            result[batch] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError:
            result[batch] = None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (a smoke test: figures not kept)")
    parser.add_argument("--quick", action="store_true", help="few steps, small images, no compile (smoke run)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per setting")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in PEAK_TFLOPS")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where gpu.json and gpu.md go")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("benchmarks/gpu.py: no CUDA GPU on this machine: nothing measured (run it where a GPU is)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)"
    peak = peak_tflops(gpu, args.peak_tflops)
    steps = 2 if args.quick else args.steps
    settings = [(n, b, "64x48", 4) for n, b, _, _ in SETTINGS] if args.quick else SETTINGS
    work = Path(tempfile.mkdtemp(prefix="posetune-gpu-"))
    figures: dict = {"gpu": gpu, "peak_bf16_tflops": peak, "steps": steps}
    try:
        frames = 16 if args.quick else 1024
        generate(work / "data", {"train": frames, "val": 8}, seed=0)
        for name, backbone, scale, batch in settings:
            print(f"{name}: batch {batch}", flush=True)
            base = config(work / "data", work / "cache", backbone, scale, batch, "bf16")
            dataset = load_split(base, "train")
            rt = _runtime(base, device)
            flops = flops_per_image(base, rt)
            step_only, first = measure(base, rt, dataset, steps, pipeline=False)
            with_pipeline, _ = measure(base, rt, dataset, steps, pipeline=True)
            row = {
                "batch": batch,
                "flops_per_image": flops,
                "images_per_s": round(step_only, 1),
                "images_per_s_with_pipeline": round(with_pipeline, 1),
                "gpu_busy": round(min(1.0, with_pipeline / step_only), 3),
                "mfu": round(step_only * flops / (peak * 1e12), 3) if peak else None,
                "first_step_s": round(first, 2),
                "options": {},
            }
            options = [("fp32", (), "fp32"), ("fused_adam", ("optimizer.fused=true",), "bf16")]
            if not args.quick:  # a smoke run skips the minutes a CPU compile takes
                options.append(("compile", ("train.compile=true",), "bf16"))
            for option, extra, precision in options:
                variant = config(work / "data", work / "cache", backbone, scale, batch, precision, *extra)
                rate, first = measure(variant, _runtime(variant, device), dataset, steps, pipeline=False)
                row["options"][option] = {"images_per_s": round(rate, 1), "first_step_s": round(first, 2)}
            with _channels_last_off():
                rate, _ = measure(base, _runtime(base, device), dataset, steps, pipeline=False)
            row["options"]["no_channels_last"] = {"images_per_s": round(rate, 1)}
            if backbone == "vgg16":
                row["peak_memory_gib"] = peak_memory(base, rt, dataset, [16, 32, 64, 128])
                row["reference_run_hours"] = round(REFERENCE_IMAGES / step_only / 3600, 2)
            figures[f"{name}_bf16"] = row
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if device.type != "cuda":
        print("smoke run on the CPU: no figures written")
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gpu.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.results / "gpu.md").write_text(report(figures))
    print(report(figures))
    return 0


def _runtime(cfg, device: torch.device) -> Runtime:
    return Runtime(device, amp_dtype=autocast_dtype(cfg.precision, device), normalize=cfg.dataset.normalize)


@contextlib.contextmanager
def _channels_last_off():
    """Runtime.channels_last is a property of the device; switch it off for one measurement."""
    original = Runtime.channels_last
    Runtime.channels_last = property(lambda self: False)
    try:
        yield
    finally:
        Runtime.channels_last = original


def report(figures: dict) -> str:
    lines = [
        f"Training throughput on {figures['gpu']} (peak dense bf16 {figures['peak_bf16_tflops']} TFLOP/s, "
        f"{figures['steps']} timed steps per setting):",
        "",
        "| setting | batch | img/s (step) | img/s (with pipeline) | GPU busy | MFU | fp32 | compile | fused Adam "
        "| no channels_last |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in figures.items():
        if not isinstance(row, dict) or "images_per_s" not in row:
            continue
        o = row["options"]
        lines.append(
            f"| {key} | {row['batch']} | {row['images_per_s']} | {row['images_per_s_with_pipeline']} | "
            f"{row['gpu_busy']} | {row['mfu']} | {o['fp32']['images_per_s']} | {o['compile']['images_per_s']} "
            f"(compile {o['compile']['first_step_s']} s) | {o['fused_adam']['images_per_s']} | "
            f"{o['no_channels_last']['images_per_s']} |"
        )
    vgg = figures.get("vgg16_224_bf16")
    if vgg:
        lines += [
            "",
            f"VGG16 at 224 px: peak memory (GiB) by batch size {vgg['peak_memory_gib']}; the reference run "
            f"(120 epochs x 30,000 images) would take {vgg['reference_run_hours']} h on one GPU.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
