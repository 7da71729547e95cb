"""Cluster files, checked offline before anything is started or paid for.

- A Ray cluster-launcher file (``cluster/gcp.yaml``): Ray's own validation (``prepare_config``
  + ``validate_config``), then what Ray's schema leaves unchecked because ``node_config`` is
  passed to the cloud as is: GPU node types that GCE would refuse or that would never see
  their GPUs, workers that cannot write to the bucket, a preemptible head, a VM image that
  changes under you, an image whose Ray differs from this machine's, public bindings.
- A KubeRay ``RayJob`` (``cluster/kuberay.yaml``): the RayJob v1 schema (vendored in
  ``posetune/cluster/schemas``), then the operator's own runtime rules the schema does not carry and
  unknown fields (the schema allows any).

Every problem is one line naming the node type or key, the value and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import metadata, resources
from typing import Any

import yaml

from posetune import internals, storage
from posetune.choices import did_you_mean
from posetune.errors import ConfigError

PLACEHOLDERS = {
    "YOUR_PROJECT_ID": "your GCP project id",
    "YOUR_REGION": "your GCP region (e.g. us-central1)",
    "YOUR_ZONE": "your GCP zone (e.g. us-central1-a)",
    "YOUR_BUCKET": "your bucket's name (without gs://)",
}
STORAGE_SCOPES = {
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
}
PUBLIC_HOSTS = {"0.0.0.0", "::", "[::]"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYJOB_NAME = 47  # the operator derives longer resource names from it


def check_cluster_file(path: str) -> str:
    """Check a cluster file; return what it describes, or raise one ConfigError listing every
    problem."""
    data = yaml.safe_load(storage.read_text(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a cluster file (a YAML mapping was expected)")
    if data.get("kind") == "RayJob":
        problems, what = rayjob_problems(data), "KubeRay RayJob"
    elif "available_node_types" in data or "provider" in data:
        problems, what = launcher_problems(data), "Ray cluster-launcher file"
    else:
        raise ConfigError(
            f"{path}: neither a Ray cluster-launcher file (provider:) nor a KubeRay RayJob (kind: RayJob)"
        )
    if problems:
        raise ConfigError(f"{path} ({what}): {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return what


def placeholder_problems(data: Any) -> list[str]:
    """One line per YOUR_* placeholder left in the file, with the keys that hold it."""
    where: dict[str, list[str]] = {}
    for key, value in _strings(data):
        for name in re.findall(r"YOUR_[A-Z_]+", value):
            keys = where.setdefault(name, [])
            if key not in keys:
                keys.append(key)
    return [
        f"{name} is not set ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}): "
        f"replace it with {PLACEHOLDERS.get(name, 'your value')}"
        for name, keys in where.items()
    ]


def _strings(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, f"{path}[{i}]")
    elif isinstance(data, str):
        yield path, data


# --- Ray cluster launcher -------------------------------------------------------------------------


def launcher_problems(data: dict[str, Any]) -> list[str]:
    try:
        config = internals.validated_cluster_config(data)
    except Exception as exc:  # jsonschema's ValidationError, or Ray's own ValueError
        return [f"Ray's validation: {_first_line(exc)}", *placeholder_problems(data)]
    problems = placeholder_problems(data)
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        problems += _node_type_problems(name, node_type, name == head)
    problems += _image_problems(config.get("docker") or {})
    problems += _public_binding_problems(config)
    return problems


def _node_type_problems(name: str, node_type: dict[str, Any], is_head: bool) -> list[str]:
    where = f"available_node_types.{name}"
    node = node_type.get("node_config") or {}
    accelerators = node.get("guestAccelerators") or []
    attached = sum(int(a.get("acceleratorCount", 0)) for a in accelerators)
    gpus = (node_type.get("resources") or {}).get("GPU", 0)
    scheduling = _scheduling(node)
    problems = []
    if attached or gpus:
        if gpus != attached:
            problems.append(
                f"{where}.resources.GPU = {gpus}, but node_config.guestAccelerators attach {attached} GPU(s): "
                "make them equal (Ray schedules trials by resources.GPU)"
            )
        if scheduling.get("onHostMaintenance") != "TERMINATE":
            problems.append(
                f"{where}.node_config.scheduling.onHostMaintenance = {scheduling.get('onHostMaintenance')!r}: "
                "GPU VMs cannot live-migrate; set it to TERMINATE"
            )
        if not _installs_driver(node):
            problems.append(
                f"{where}.node_config.metadata: no install-nvidia-driver item: add "
                "{key: install-nvidia-driver, value: 'True'} so the NVIDIA driver is installed at boot"
            )
    if is_head and (scheduling.get("preemptible") or scheduling.get("provisioningModel") == "SPOT"):
        problems.append(
            f"{where}.node_config.scheduling: the head node is preemptible (preemptible / provisioningModel: SPOT): "
            "a preempted head ends the search and MLflow; make the head a standard VM"
        )
    if not is_head and not _has_storage_scope(node):
        problems.append(
            f"{where}.node_config.serviceAccounts: no service account with a storage scope: workers write "
            "checkpoints to gs://; add one with scope https://www.googleapis.com/auth/cloud-platform"
        )
    for disk in node.get("disks") or []:
        image = (disk.get("initializeParams") or {}).get("sourceImage", "")
        if "/family/" in image:
            problems.append(
                f"{where}.node_config.disks.sourceImage = {image!r} is an image family, which changes under you: "
                "pin a dated image (gcloud compute images list --project deeplearning-platform-release)"
            )
    return problems


def _scheduling(node: dict[str, Any]) -> dict[str, Any]:
    scheduling = node.get("scheduling") or {}
    if isinstance(scheduling, list):  # Ray's own examples write it as a list of one-key maps
        return {k: v for item in scheduling for k, v in item.items()}
    return scheduling


def _installs_driver(node: dict[str, Any]) -> bool:
    items = (node.get("metadata") or {}).get("items") or []
    return any(i.get("key") == "install-nvidia-driver" and str(i.get("value")).lower() == "true" for i in items)


def _has_storage_scope(node: dict[str, Any]) -> bool:
    return any(set(account.get("scopes") or []) & STORAGE_SCOPES for account in node.get("serviceAccounts") or [])


def _image_problems(docker: dict[str, Any]) -> list[str]:
    images = {key: docker[key] for key in ("image", "head_image", "worker_image") if docker.get(key)}
    if not images:
        return ["docker.image is not set: every node must run the posetune cluster image (see Dockerfile)"]
    return [problem for key, image in images.items() if (problem := ray_version_problem(f"docker.{key}", image))]


def ray_version_problem(key: str, image: str) -> str | None:
    """An image must run this machine's Ray: its tag says which (ray:2.60.0-..., ...-ray2.60.0)."""
    local = metadata.version("ray")
    tag = image.rsplit("/", 1)[-1]
    found = re.search(r"ray[-_:]?v?(\d+\.\d+\.\d+)", tag)
    if found is None:
        return f"{key} = {image!r}: its tag does not say its Ray version; tag it ...-ray{local} (Ray here: {local})"
    if found.group(1) != local:
        return (
            f"{key} = {image!r} runs Ray {found.group(1)} but this machine runs Ray {local}: "
            f"rebuild the image from the Dockerfile (rayproject/ray:{local}-...) or install ray=={found.group(1)} here"
        )
    return None


def _public_binding_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    for section in ("head_start_ray_commands", "worker_start_ray_commands", "head_setup_commands", "setup_commands"):
        for i, command in enumerate(config.get(section) or []):
            problems += host_problems(f"{section}[{i}]", command)
    docker = config.get("docker") or {}
    for section in ("run_options", "head_run_options", "worker_run_options"):
        for option in docker.get(section) or []:
            if re.match(r"(-p|--publish)\b", option.strip()):
                problems.append(f"docker.{section}: {option!r} publishes a port: remove it and use an SSH tunnel")
    return problems


def host_problems(where: str, command: str) -> list[str]:
    """`--dashboard-host 0.0.0.0`, `mlflow server --host 0.0.0.0` and the like in a command."""
    return [
        f"{where}: {flag} {host} listens on every interface: bind 127.0.0.1 and reach it through "
        "`ray dashboard` or an SSH tunnel (ssh -L)"
        for flag, host in re.findall(r"(--dashboard-host|--host|-h)[= ]+(\S+)", command)
        if host.strip("'\"") in PUBLIC_HOSTS
    ]


def _first_line(exc: Exception) -> str:
    path = ".".join(str(p) for p in getattr(exc, "absolute_path", []))
    message = getattr(exc, "message", None) or str(exc)
    return f"{path}: {message.splitlines()[0]}" if path else message.splitlines()[0]


# --- KubeRay RayJob --------------------------------------------------------------------------------


def rayjob_schema() -> dict[str, Any]:
    return json.loads(resources.files("posetune.cluster").joinpath("schemas/rayjob-v1.schema.json").read_text())


def rayjob_problems(data: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = rayjob_schema()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    problems = [f"RayJob schema: {_first_line(error)}" for error in errors[:10]]
    problems += unknown_field_problems(data, schema)
    problems += placeholder_problems(data)
    if errors:
        return problems
    spec = data.get("spec") or {}
    name = (data.get("metadata") or {}).get("name", "")
    if len(name) > MAX_RAYJOB_NAME or not DNS_1035.match(name):
        problems.append(
            f"metadata.name = {name!r}: must be a DNS-1035 label (lowercase letters, digits, '-'; starting with "
            f"a letter) of at most {MAX_RAYJOB_NAME} characters"
        )
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append(
            f"spec.ttlSecondsAfterFinished = {spec['ttlSecondsAfterFinished']} needs "
            "spec.shutdownAfterJobFinishes: true (the operator rejects the job otherwise)"
        )
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode = {mode!r}: choose one of {', '.join(SUBMISSION_MODES)}")
    cluster = spec.get("rayClusterSpec") or {}
    problems += _ray_version_problems(cluster)
    problems += _head_group_problems(cluster.get("headGroupSpec") or {})
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        problems += _worker_group_problems(f"spec.rayClusterSpec.workerGroupSpecs[{i}] ({group['groupName']})", group)
    return problems


def unknown_field_problems(data: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: the RayJob schema accepts them, the operator ignores
    them, so a misspelt `shutdownAfterJobFinish` would silently keep a GPU cluster running."""
    problems = []
    if isinstance(data, dict) and "properties" in schema and "additionalProperties" not in schema:
        known = schema["properties"]
        for key, value in data.items():
            where = f"{path}.{key}" if path else key
            if key not in known:
                problems.append(f"{where}: unknown field{did_you_mean(key, known)}")
            else:
                problems += unknown_field_problems(value, known[key], where)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(data):
            problems += unknown_field_problems(item, schema["items"], f"{path}[{i}]")
    return problems


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def _ray_version_problems(cluster: dict[str, Any]) -> list[str]:
    local = metadata.version("ray")
    problems = []
    if cluster.get("rayVersion") != local:
        problems.append(
            f"spec.rayClusterSpec.rayVersion = {cluster.get('rayVersion')!r}: set it to {local!r}, "
            "the Ray of this machine and of the image"
        )
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    for group in groups:
        for container in _containers(group):
            problem = ray_version_problem(f"container {container.get('name')}.image", container.get("image", ""))
            if problem:
                problems.append(problem)
    return problems


def _head_group_problems(head: dict[str, Any]) -> list[str]:
    problems = []
    host = str((head.get("rayStartParams") or {}).get("dashboard-host", "127.0.0.1"))
    if host in PUBLIC_HOSTS:
        problems.append(
            f"spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host = {host!r}: bind 127.0.0.1 and "
            "use kubectl port-forward"
        )
    if head.get("serviceType") in ("LoadBalancer", "NodePort"):
        problems.append(
            f"spec.rayClusterSpec.headGroupSpec.serviceType = {head['serviceType']!r} exposes the head: "
            "use ClusterIP and kubectl port-forward"
        )
    for container in _containers(head):
        for _, command in _strings(container.get("lifecycle") or {}):
            problems += host_problems(f"head container {container.get('name')}", command)
    return problems


def _worker_group_problems(where: str, group: dict[str, Any]) -> list[str]:
    problems = []
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
    if low > high:
        problems.append(f"{where}: minReplicas = {low} > maxReplicas = {high}: the operator rejects it")
    replicas = group.get("replicas")
    if replicas is not None and not low <= replicas <= high:
        problems.append(f"{where}: replicas = {replicas} is outside [minReplicas, maxReplicas] = [{low}, {high}]")
    wants_gpu = any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}) for c in _containers(group))
    tolerations = ((group.get("template") or {}).get("spec") or {}).get("tolerations") or []
    if wants_gpu and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        problems.append(
            f"{where}: asks for nvidia.com/gpu but tolerates no nvidia.com/gpu taint: GPU nodes would never "
            "take its pods; add {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}"
        )
    return problems
