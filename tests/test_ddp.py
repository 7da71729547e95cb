"""Two gloo processes on the CPU, without Ray: with model.sync_batchnorm a 2-worker update
equals one process training on the combined batch; without it (per-rank BatchNorm) it does not.
Validation metrics gathered from two ranks equal one process's.

In float64: BatchNorm's backward over 4-sample batches amplifies float32 summation-order noise
to ~1e-3 relative after one step, which would hide a real error; in float64 the synchronised
update matches to 1e-15, and the unsynchronised one misses by ~1e-2."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from posetune.config import ModelConfig
from posetune.train.losses import get_orientation_loss, pose_loss
from posetune.train.model import create_model, use_sync_batchnorm

from helpers import free_port

BATCH = 8  # combined; each of the two ranks takes half


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, 48, 48, generator=generator)
    translations = torch.rand(BATCH, 3, generator=generator)
    quaternions = torch.nn.functional.normalize(torch.randn(BATCH, 4, generator=generator), dim=1)
    return images, translations, quaternions


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone="resnet18", translation_head=[16], orientation_head=[16]))


def one_step(net: torch.nn.Module, images, translations, quaternions) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    translation, quaternion = net(images)
    loss = pose_loss(translation, quaternion, translations, quaternions, 1.0, get_orientation_loss("geodesic"))
    loss.backward()
    optimizer.step()


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    net = getattr(net, "module", net)
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def _rank(rank: int, port: int, sync: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        net = model()
        if sync:
            net = use_sync_batchnorm(net, torch.device("cpu"))
        ddp = DistributedDataParallel(net)
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        images, translations, quaternions = batch()
        one_step(ddp, images[half], translations[half], quaternions[half])
        out[rank] = state(ddp)
    finally:
        dist.destroy_process_group()


def two_ranks(sync: bool) -> dict[int, dict[str, torch.Tensor]]:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(free_port(), sync, out), nprocs=2, start_method="spawn")
        return dict(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sync_batchnorm_two_ranks_equal_one_process_on_the_combined_batch():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = model()
        one_step(single, *batch())
    finally:
        torch.set_default_dtype(dtype)
    expected = state(single)

    ranks = two_ranks(sync=True)
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # DDP keeps ranks identical
        assert torch.allclose(ranks[0][key], value, atol=1e-10, rtol=1e-9), (key, (ranks[0][key] - value).abs().max())

    # Per-rank BatchNorm normalises each half with its own statistics: not the combined batch.
    unsynced = two_ranks(sync=False)
    differs = [k for k in expected if not torch.allclose(unsynced[0][k], expected[k], atol=1e-6, rtol=1e-5)]
    assert any("running_mean" in k for k in differs) and any("weight" in k for k in differs)


def _evaluate_rank(rank: int, port: int, root: str, out: dict) -> None:
    from posetune.train.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        out[rank] = evaluate_once(root, Runtime(torch.device("cpu"), rank=rank, world_size=2))
    finally:
        dist.destroy_process_group()


def evaluate_once(root: str, runtime) -> dict[str, float]:
    """The metrics of a fixed model on the 32-frame val split, batches of 5 (uneven shards)."""
    from posetune.config import load_config
    from posetune.data.loader import load_split
    from posetune.train.loop import evaluate

    cfg = load_config(None, [f"dataset.root={root}", "dataset.image_scale=48x48", "dataset.cache=false"], environ={})
    net = model().eval()
    return evaluate(net, load_split(cfg, "val"), 5, runtime)


@pytest.mark.timeout(300)
def test_gathered_validation_metrics_equal_one_process(synth_small):
    from posetune.train.runtime import Runtime

    single = evaluate_once(str(synth_small), Runtime(torch.device("cpu")))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_evaluate_rank, args=(free_port(), str(synth_small), out), nprocs=2, start_method="spawn")
        ranks = dict(out)
    assert ranks[0] == ranks[1]  # every rank reports the metrics of the whole split
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _group_rank(rank: int, port: int, out: dict) -> None:
    """Two micro-batches of one accumulation group on each rank, with and without saving the
    group's gradients (train.resume._group_gradients) after the first."""
    from posetune.train.resume import _group_gradients
    from posetune.train.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_default_dtype(torch.float64)
        generator = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        data = [(torch.randn(4, 5, generator=generator), torch.randn(4, 2, generator=generator)) for _ in range(2)]
        for saved in (False, True):
            torch.manual_seed(0)
            net = DistributedDataParallel(torch.nn.Linear(5, 2))
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            with net.no_sync():
                torch.nn.functional.mse_loss(net(data[0][0]), data[0][1]).backward()
            if saved:
                out[f"saved{rank}"] = _group_gradients(net.module, Runtime(torch.device("cpu"), rank, 2))
            torch.nn.functional.mse_loss(net(data[1][0]), data[1][1]).backward()  # all-reduces
            optimizer.step()
            out[f"{saved}{rank}"] = state(net)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_mid_group_checkpoint_keeps_the_group_update():
    """Saving a checkpoint inside an accumulation group averages the group's gradients over
    the ranks, in place (one copy to save): the group's update is unchanged, and every rank
    holds the same saved gradients, so a resume on any rank continues the same group."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_group_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
        out = dict(out)
    for rank in (0, 1):
        for key, value in out[f"False{rank}"].items():
            assert torch.allclose(value, out[f"True{rank}"][key], atol=1e-12), key
    for a, b in zip(out["saved0"], out["saved1"], strict=True):
        assert torch.equal(a, b)


class _TinyPose(torch.nn.Module):
    """A pose model small enough to compile in seconds: pixels -> (translation, quaternion)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3 * 8 * 8, 7)

    def forward(self, images):
        out = self.net(images.flatten(1))
        return out[:, :3], out[:, 3:]


def _all_reduce_rank(rank: int, port: int, compile_model: bool, out: dict) -> None:
    """One epoch of 4 micro-batches in groups of 2 through train_batches, counting DDP's
    gradient all-reduces with a comm hook."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from posetune.config import Config
    from posetune.train.loop import Step, train_batches
    from posetune.train.resume import TrainState
    from posetune.train.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ddp = DistributedDataParallel(_TinyPose())
        calls = []

        def counting(state, bucket):
            calls.append(1)
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting)
        cfg = Config()
        cfg.train.accumulation_steps, cfg.optimizer.grad_clip_norm = 2, None
        rt = Runtime(torch.device("cpu"), rank, 2, normalize="none")
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        compiled = torch.compile(ddp, backend="eager") if compile_model else None
        step = Step(ddp, optimizer, scaler, get_orientation_loss("geodesic"), rt, cfg, lambda _: 0.1, compiled)
        generator = torch.Generator().manual_seed(rank)
        loader = [
            (
                torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=generator),
                torch.rand(2, 3, generator=generator),
                torch.nn.functional.normalize(torch.randn(2, 4, generator=generator), dim=1),
            )
            for _ in range(4)
        ]
        list(train_batches(step, loader, TrainState()))
        out[rank] = len(calls)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_gradient_accumulation_all_reduces_once_per_group(compile_model):
    """DDP's no_sync holds the all-reduce to a group's last micro-batch, also when train.compile
    wraps the DDP module (a compiled module is not a DistributedDataParallel: the check used to
    miss it, and every micro-batch all-reduced)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_all_reduce_rank, args=(free_port(), compile_model, out), nprocs=2, start_method="spawn")
        assert dict(out) == {0: 2, 1: 2}  # 4 micro-batches, 2 groups, one bucket
