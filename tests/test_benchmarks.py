"""The GPU benchmark is ready to run where a GPU is: here it skips clearly, and its whole path
runs as a smoke test on the CPU (small images, two steps, no figures written)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_benchmark_skips_without_a_gpu_and_runs_on_the_cpu_as_a_smoke_test(tmp_path):
    # The CPU smoke run took 3.8 min alone on a slow host here, and over 500 s at nice 19 beside
    # make test's Ray tests: a generous limit, since a timeout says nothing about the script.
    def run(*args):
        command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--results", str(tmp_path), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1200)

    skipped = run()
    assert skipped.returncode == 0 and "no CUDA GPU on this machine: nothing measured" in skipped.stdout
    smoke = run("--allow-cpu", "--quick")
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    for setting in ("vgg16_224", "resnet50_224", "mobilenet_v3_small_128x80"):
        assert f"{setting}: batch 4" in smoke.stdout
    assert '"flops_per_image"' in smoke.stdout and "smoke run on the CPU: no figures written" in smoke.stdout
    assert list(tmp_path.iterdir()) == []
