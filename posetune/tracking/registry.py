"""The MLflow model registry: a checkpoint's model registered with its config, and loaded back
(`posetune predict --model models:/NAME/latest`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from posetune.config import Config
from posetune.errors import PosetuneError
from posetune.search.events import REPORTED
from posetune.tracking.store import mlflow_client, resolve_tracking_uri


def register_model(uri: str, run_id: str, checkpoint: str, cfg: Config, name: str, metrics: dict) -> str:
    """Log the checkpoint's model as an MLflow PyTorch model in `run_id` and register it.
    The resolved config travels on the model (``posetune_config``) and as config.yaml."""
    import mlflow
    import mlflow.pytorch

    from posetune.train.inference import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint)
    model.posetune_config = cfg.to_dict()
    # Pickle, not MLflow 3's torch.export default (which needs an input example); MLflow warns
    # that pickles run code when loaded, which is how every full PyTorch model loads.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder, "config.yaml")
        config_file.write_text(cfg.to_yaml())
        with mlflow.start_run(run_id=run_id):  # the fluent API, in this (driver) process only
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                registered_model_name=name,
                extra_files=[str(config_file)],
                pip_requirements=["posetune", "torch", "torchvision"],  # skip slow inference
                serialization_format="pickle",  # the default, torch.export, needs an input example
            )
    version = str(info.registered_model_version)
    client = mlflow_client(uri)
    for key, value in metrics.items():
        if key in REPORTED and isinstance(value, (int, float)):
            client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description="posetune pose model; metrics in the version tags")
    return version


def load_registered_model(model_uri: str, tracking_uri: str | None = None):
    """(model, Config) from e.g. models:/NAME/latest."""
    import mlflow
    import mlflow.pytorch

    from posetune.config import config_from_dict

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create the database (and its folder) just to find nothing in it.
        raise PosetuneError(
            f"cannot load {model_uri}: there is no MLflow store at {uri} yet (no model was ever registered "
            "there); pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store that holds it"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as exc:  # unknown name/version, unreachable store
        raise PosetuneError(f"cannot load {model_uri} from {uri}: {str(exc).splitlines()[0]}") from None
    config = getattr(model, "posetune_config", None)
    if config is None:
        raise PosetuneError(f"{model_uri} is not a posetune model (it carries no posetune_config)")
    return model.eval(), config_from_dict(config)
