"""What a search report hands Ray Train to upload, per backbone of search_spaces/default.yaml.

    python benchmarks/checkpoint_size.py

Each trial's report attaches its checkpoint folder: last.pt (a full checkpoint: weights,
Adam's two moments, grad scaler, RNG states, history) and best.pt. Before, best.pt was a
second full checkpoint; now it holds the weights and config only (train.checkpoint.
WEIGHTS_KEYS). For each backbone the model of configs/reference.yaml is built (random
initialisation), Adam takes one step so that its state exists, and both files are written
with posetune's own checkpoint code; the figures are their sizes. Writes
benchmarks/results/checkpoint_size.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml

from posetune.config import load_config
from posetune.train.checkpoint import save_checkpoint, weights_only
from posetune.train.loop import _optimizer
from posetune.train.model import create_model
from posetune.train.resume import TrainState, checkpoint_state
from posetune.train.runtime import Runtime

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def sizes(backbone: str, folder: Path) -> dict[str, float]:
    """MiB of a full checkpoint and of its weights-only part, for the reference model."""
    cfg = load_config(REPO / "configs" / "reference.yaml", [f"model.backbone={backbone}"], environ={})
    rt = Runtime(torch.device("cpu"))
    model = create_model(cfg.model)
    optimizer, scaler = _optimizer(cfg, model, rt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam creates its moments at the first step
    state = checkpoint_state(cfg, model, optimizer, scaler, TrainState(), rt)
    save_checkpoint(state, folder / "last.pt")
    save_checkpoint(weights_only(state), folder / "best.pt")
    full, weights = ((folder / name).stat().st_size / 2**20 for name in ("last.pt", "best.pt"))
    return {
        "full_mib": round(full, 1),
        "weights_mib": round(weights, 1),
        "report_before_mib": round(2 * full, 1),
        "report_now_mib": round(full + weights, 1),
        "ratio": round((full + weights) / (2 * full), 3),
    }


def main() -> None:
    space = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    backbones = space["parameters"]["model.backbone"]["values"]
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for backbone in backbones:
            figures[backbone] = sizes(backbone, Path(folder))
            print(backbone, figures[backbone], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_size.json").write_text(
        json.dumps({"torch": torch.__version__, "backbones": figures}, indent=2) + "\n"
    )
    lines = [
        "Checkpoint a search report uploads, per backbone of search_spaces/default.yaml "
        "(configs/reference.yaml's model, Adam state after one step; MiB):",
        "",
        "| backbone | last.pt (full) | best.pt (weights only) | per report before (2 full) | per report now "
        "| now / before |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {b} | {f['full_mib']} | {f['weights_mib']} | {f['report_before_mib']} | {f['report_now_mib']} "
            f"| {f['ratio']} |"
            for b, f in figures.items()
        ),
    ]
    (RESULTS / "checkpoint_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
