"""The `posetune` command line. Each command parses its options, calls one library function
and prints the result. User errors (``PosetuneError``) print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from posetune.errors import PosetuneError
from posetune.tables import format_table

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("posetune")

OVERRIDES_HELP = "config overrides as section.key=value (e.g. train.epochs=5 optimizer.lr=3e-4)"


def _setup_logging(verbose: bool) -> None:
    """Log lines (progress, MLflow status; other libraries' warnings) go to stderr, results
    and tables to stdout."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow configures its logger on import
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    print("\n".join(format_table(rows, header)))


# --- commands ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from posetune.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors come before torch's import time
    from posetune import storage
    from posetune.train.loop import default_out_dir, fit

    cfg.system.out_dir = cfg.system.out_dir or str(default_out_dir())
    start = time.perf_counter()
    unlogged: list[str] = []
    if cfg.tracking.enabled:
        from posetune.tracking.runs import TrainRun

        with TrainRun(cfg, storage.local_path(cfg.system.out_dir, "system.out_dir")) as run:
            result = fit(cfg, on_evaluation=run.on_evaluation)
        unlogged = run.unlogged
    else:
        result = fit(cfg)
    print(f"run folder: {result.out_dir}  ({time.perf_counter() - start:.0f} s)")
    if result.best:
        print(f"best evaluation (epoch {result.best['epoch']}):")
        _print_metrics(result.best)
    for item in unlogged:  # also warned on stderr as they happen; the run folder has them all
        print(f"error: MLflow did not receive {item}")
    return 1 if unlogged else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from posetune import storage
    from posetune.train.inference import evaluate_checkpoint

    metrics, count = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.device, args.sha256)
    print(f"{args.split} split: {count} samples")
    _print_metrics(metrics)
    if args.json:
        storage.write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from posetune.train.inference import model_from_checkpoint, predict_images

    if args.model:
        from posetune.tracking.registry import load_registered_model

        model, cfg = load_registered_model(args.model, args.tracking_uri)
    else:
        model, cfg = model_from_checkpoint(args.checkpoint, args.sha256)
    for result in predict_images(model, cfg, args.images, args.device):
        print(json.dumps(result))
    return 0


def _progress_bar(total: int, unit: str, desc: str):
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=None, **scale)


def cmd_synth(args: argparse.Namespace) -> int:
    from posetune import storage
    from posetune.data.tools import check_synthesis, synthesize

    splits = {"train": args.train, "val": args.val, "test": args.test}
    check_synthesis(args.out, splits, args.overwrite)  # before the progress bar is drawn
    rendered: list[float] = []  # when the rendering ended: the upload is not rendering time

    def push(scratch: str, destination: str) -> None:
        rendered.append(time.perf_counter())
        bar.close()
        _push(scratch, destination, "cube_position", args.overwrite, shown="the rendered dataset")

    start = time.perf_counter()
    with _progress_bar(sum(splits.values()), "img", "rendering") as bar:
        written = synthesize(
            args.out,
            splits,
            args.seed,
            workers=args.workers,
            camera_jitter=not args.no_jitter,
            overwrite=args.overwrite,
            on_progress=bar.update,
            push=push,
        )
    seconds = (rendered[0] if rendered else time.perf_counter()) - start
    for name in written:
        print(f"{name}: {splits[name]} images -> {storage.join(args.out, name)}")
    print(f"{sum(splits.values())} images in {seconds:.1f} s ({sum(splits.values()) / seconds:.0f} img/s)")
    return 0


def _push(source: str, destination: str, label: str, overwrite: bool, shown: str | None = None) -> None:
    from posetune import storage
    from posetune.data.tools import check_push_destination, folder_size, present_splits, push_dataset

    check_push_destination(destination)  # before the progress bar is drawn
    root = storage.local_path(source, "SRC")
    total = folder_size(root, present_splits(root)) if root.is_dir() else 0
    with _progress_bar(total, "B", f"uploading to {destination}") as bar:
        indexes, sent = push_dataset(source, destination, label, overwrite, bar.update)
    counts = ", ".join(f"{split} {len(index)}" for split, index in indexes.items())
    print(f"pushed {shown or source} ({counts} samples, {sent / 2**20:.1f} MiB) -> {destination}")


def cmd_push(args: argparse.Namespace) -> int:
    _push(args.source, args.destination, args.label, args.overwrite)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from posetune.data.tools import check_dataset

    rows = []
    for split, index in check_dataset(args.root, args.splits, args.label).items():
        rows.append([split, index.format, len(index), index.skipped, index.source.describe()])
    print_table(rows, ["split", "format", "samples", "skipped", "location"])
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from posetune.search.results import summary_lines
    from posetune.search.run import plan_search, run_search
    from posetune.search.space import load_space
    from posetune.tracking.runs import open_search_run

    if args.retry_failed and not args.resume:
        from posetune.errors import ConfigError

        raise ConfigError("--retry-failed runs the failed trials of a search again: use it with --resume")
    space, base = load_space(args.space, args.overrides, args.name)
    if args.dry_run:
        print("\n".join(plan_search(space, base)))
        print("dry run: nothing was started or written")
        return 0
    resume = ["posetune search", args.space, "--resume", *(["--name", args.name] if args.name else []), *args.overrides]
    resume_hint = f"search interrupted; continue it with:\n  {' '.join(resume)}"
    try:
        with open_search_run(space, args.space) as run:
            summary = run_search(space, base, resume=args.resume, retry_failed=args.retry_failed, listeners=[run])
    except KeyboardInterrupt:
        print(f"\n{resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print("\n".join(summary_lines(summary)))
    if run.recreated:
        print(f"MLflow: runs {run.uri} did not have, re-created from the experiment folder: {', '.join(run.recreated)}")
    if run.uri and not run.unlogged:
        print(f"MLflow: everything was logged to {run.uri} (`posetune ui` to browse an embedded store)")
    if summary.interrupted:
        print(f"\n{resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1 if summary.problems else 0


def cmd_results(args: argparse.Namespace) -> int:
    from posetune import storage
    from posetune.config import parse_override
    from posetune.errors import ConfigError
    from posetune.search.results import load_results, rank, results_table

    storage_path = "runs/search"
    for text in args.overrides:
        key, value = parse_override(text)
        if key != "storage.path":
            raise ConfigError(f"posetune results takes only storage.path=..., got {text!r}")
        storage_path = str(value)
    records, metric, mode = load_results(storage.join(storage.absolute(storage_path), args.name))
    if args.json:
        print(json.dumps({"trials": [record.to_json() for record in records]}, indent=2))
    else:
        print("\n".join(results_table(rank(records, metric, mode), metric)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from posetune.errors import ConfigError
    from posetune.tracking.ui import experiment_urls, start_ui

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port: choose one from 1 to 65535")

    server = start_ui(args.port)
    # SIGTERM (a service manager, `kill`) must stop the server too, not orphan it; Ctrl-C reaches
    # both processes through the terminal.
    terminated = False

    def stop(signum: int, frame: object) -> None:
        nonlocal terminated
        terminated = True
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    print(f"MLflow UI on the embedded store: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    for name, url in experiment_urls(args.port):
        print(f"  {name}: {url}", flush=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return 0
    return 0 if terminated else code


def cmd_cluster_check(args: argparse.Namespace) -> int:
    from posetune.cluster.files import check_cluster_file

    what = check_cluster_file(args.file)
    print(f"{args.file}: ok ({what})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from posetune.config import config_keys, load_config

    if args.keys:
        print("\n".join(config_keys()))
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    from posetune.train.metrics import METRIC_NAMES

    print_table([[name, metrics[name]] for name in METRIC_NAMES if name in metrics], ["metric", "value"])


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posetune",
        description="Hyperparameter search and training for 6-DoF object pose estimation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train one model",
        description="Train one pose model. "
        "Outputs go to system.out_dir: config.yaml, checkpoints/{last,best}.pt, metrics.json.",
    )
    train.add_argument("--config", help="YAML config file (e.g. configs/quick.yaml)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a split",
        description="Print a checkpoint's metrics on a dataset split.",
    )
    evaluate.add_argument(
        "--checkpoint", required=True, help="checkpoint: a file, gs://BUCKET/KEY or https://... (#sha256=HEX checks it)"
    )
    evaluate.add_argument("--sha256", help="expected SHA-256 of the checkpoint file (refused if it differs)")
    evaluate.add_argument("--data", help="dataset root, local or gs:// (default: the checkpoint's own)")
    evaluate.add_argument("--split", choices=["val", "test", "train"], default="val", help="split (default: val)")
    evaluate.add_argument("--json", metavar="OUT", help="also write the metrics as a JSON object to OUT")
    evaluate.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser(
        "predict",
        help="pose of the object in images",
        description="Print one JSON line per image: translation (m) and quaternion (x, y, z, w).",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint: a file, gs://BUCKET/KEY or https://... (#sha256=HEX)")
    source.add_argument("--model", help="registered MLflow model, e.g. models:/posetune-quick/latest")
    predict.add_argument(
        "--tracking-uri", help="MLflow store for --model (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)"
    )
    predict.add_argument("--sha256", help="expected SHA-256 of the checkpoint file (refused if it differs)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local, gs:// or https://)")
    predict.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    predict.set_defaults(func=cmd_predict)

    data = commands.add_parser("data", help="dataset tools (synth, check, push)")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser(
        "synth",
        help="generate a synthetic Perception dataset",
        description="Render the tutorial scene into OUT/train, OUT/val (and OUT/test) "
        "as legacy Unity Perception datasets. Deterministic for a seed; uses all cores.",
    )
    synth.add_argument("out", metavar="OUT", help="output folder, local or gs://BUCKET/PATH")
    synth.add_argument("--train", type=int, default=2000, help="training images (default: 2000)")
    synth.add_argument("--val", type=int, default=300, help="validation images (default: 300)")
    synth.add_argument("--test", type=int, default=0, help="test images (default: 0)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--workers", type=int, help="processes (default: all cores)")
    synth.add_argument("--no-jitter", action="store_true", help="disable the +-5 mm / +-1 deg camera jitter")
    synth.add_argument("--overwrite", action="store_true", help="replace existing split folders")
    synth.set_defaults(func=cmd_synth)
    check = data_commands.add_parser(
        "check",
        help="read and validate a dataset",
        description="Parse every split's labels and report samples and skipped captures.",
    )
    check.add_argument("root", help="dataset root: a folder or .zip with split folders, local or gs://")
    check.add_argument("--splits", nargs="+", default=["train", "val"], help="splits (default: train val)")
    check.add_argument("--label", default="cube_position", help="label name (default: cube_position)")
    check.set_defaults(func=cmd_check)
    push = data_commands.add_parser(
        "push",
        help="upload a dataset to a bucket",
        description="Check a local dataset folder (as `posetune data check` does) and upload its split folders to "
        "DEST: gs://BUCKET/PATH/ keeps the folders, gs://BUCKET/PATH.zip zips them first. Nothing is uploaded "
        "unless every split reads cleanly. Credentials: Application Default Credentials (or STORAGE_EMULATOR_HOST).",
    )
    push.add_argument("source", metavar="SRC", help="local dataset folder (with train/, val/, test/)")
    push.add_argument("destination", metavar="DEST", help="gs://BUCKET/PATH/ or gs://BUCKET/PATH.zip")
    push.add_argument("--label", default="cube_position", help="label name (default: cube_position)")
    push.add_argument("--overwrite", action="store_true", help="replace what is at DEST")
    push.set_defaults(func=cmd_push)

    search = commands.add_parser(
        "search",
        help="hyperparameter search (Ray Tune + Ray Train)",
        description="Search the space in SPACE.yaml: Optuna TPE (or random) proposes trials, ASHA stops weak "
        "ones by samples seen, each trial trains with a Ray Train TorchTrainer. Connects to a running Ray cluster "
        "(RAY_ADDRESS, or one on this node) or starts a local one. Outputs: results.json, best_config.yaml and "
        "best/model.pt in <storage.path>/<storage.name>/.",
    )
    search.add_argument("space", metavar="SPACE.yaml", help="search-space file (see search_spaces/README.md)")
    search.add_argument("--name", help="experiment name (default: storage.name from the file)")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    search.add_argument(
        "--retry-failed", action="store_true", help="with --resume: run failed trials again (default: they stay failed)"
    )
    search.add_argument("--dry-run", action="store_true", help="print the space, trial count and resource plan")
    search.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="search-file keys (search.num_samples=4, storage.path=/tmp/s) or base config keys (train.epochs=3)",
    )
    search.set_defaults(func=cmd_search)

    results = commands.add_parser(
        "results",
        help="the trial table of a stored search",
        description="Print a stored search's trials (best first) without running anything.",
    )
    results.add_argument("name", metavar="NAME", help="experiment name (storage.name)")
    results.add_argument("--json", action="store_true", help='print results.json: {"trials": [...]}')
    results.add_argument(
        "overrides", nargs="*", metavar="storage.path=DIR", help="where searches are stored (default: runs/search)"
    )
    results.set_defaults(func=cmd_results)

    ui = commands.add_parser(
        "ui",
        help="the MLflow UI on the embedded store",
        description="Start the MLflow UI on runs/mlflow.db (the embedded store), bound to 127.0.0.1.",
    )
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.set_defaults(func=cmd_ui)

    cluster = commands.add_parser("cluster", help="cluster files (check)")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    cluster_check = cluster_commands.add_parser(
        "check",
        help="check a cluster file offline",
        description="Check a Ray cluster-launcher file (cluster/gcp.yaml) with Ray's own validation plus what "
        "its schema skips (GPU node types with a driver wait and --gpus all, service-account scopes, a "
        "preemptible head, spot workers drained on preemption, SSD boot disks, VM image pinning, the image's Ray "
        "version, a registry login for a private image, start commands that would kill themselves, public "
        "bindings, placeholders), or a KubeRay RayJob (cluster/kuberay.yaml) against the RayJob v1 schema plus "
        "the operator's rules (a dashboard the Service reaches, no public Service, requests within the node's "
        "allocatable, the head off spot nodes, a resuming entrypoint). Nothing is contacted; exit code 2 lists "
        "every problem.",
    )
    cluster_check.add_argument(
        "file", nargs="?", default="cluster/gcp.yaml", metavar="FILE", help="default: cluster/gcp.yaml"
    )
    cluster_check.set_defaults(func=cmd_cluster_check)

    config = commands.add_parser(
        "config",
        help="print the resolved config",
        description="Print the config after defaults < --config < POSETUNE_* env < overrides.",
    )
    config.add_argument("--config", help="YAML config file")
    config.add_argument("--keys", action="store_true", help="list every valid key")
    config.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (`search S.yaml --dry-run a.b=1`), which
    # argparse's positional matching does not allow; collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except PosetuneError as exc:
        print(f"posetune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("posetune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
