"""Cluster files, checked offline before anything is started or paid for.

- A Ray cluster-launcher file (``cluster/gcp.yaml``): Ray's own validation (``prepare_config``
  + ``validate_config``), then what Ray's schema leaves unchecked because ``node_config`` is
  passed to the cloud as is: GPU node types that GCE would refuse or that would never see
  their GPUs, workers that cannot write to the bucket, a preemptible head, a VM image that
  changes under you, an image whose Ray differs from this machine's, public bindings.
- A KubeRay ``RayJob`` (``cluster/kuberay.yaml``, with the Kubernetes objects beside it in the
  same file): the RayJob v1 schema (vendored in ``posetune/cluster/schemas``), then the
  operator's own runtime rules the schema does not carry, unknown fields (the schema allows any),
  and what would keep the job from running: a loopback dashboard, a public Service, requests
  above the node's allocatable resources, a head on spot nodes, an entrypoint that cannot resume.

Both: a ``pkill -f`` / ``pgrep -f`` pattern that matches its own command line (it kills the shell
that runs it).

Every problem is one line naming the node type or key, the value and the fix.
"""

from __future__ import annotations

import json
import re
import shlex
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
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PUBLIC_SERVICE_TYPES = ("LoadBalancer", "NodePort")
# Registries that need a login on a VM: Artifact Registry and Container Registry.
PRIVATE_REGISTRY = re.compile(r"^((?:[a-z0-9-]+-docker\.pkg\.dev)|(?:(?:[a-z]+\.)?gcr\.io))/")
REGISTRY_LOGIN = re.compile(r"gcloud\s+auth\s+configure-docker|docker-credential-gcr\s+configure-docker|docker\s+login")
SSD_DISK_TYPES = ("pd-ssd", "pd-balanced", "hyperdisk-balanced", "pd-extreme")
# What a pod may request on a GKE node of these machine types, in CPUs and GiB: capacity less
# GKE's reservation (CPU: 6% of the first core, 1% of the next, 0.5% of the next 2, 0.25% above
# 4; memory: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112,
# plus 100 MiB for eviction), from https://cloud.google.com/kubernetes-engine/docs/concepts/
# plan-node-sizes#memory_and_cpu_reservations (read 2026-12-01), less DAEMONSET_HEADROOM for
# GKE's own DaemonSets on the node (kube-proxy, logging, metrics, the NVIDIA device plugin):
# an assumption; `kubectl describe node` shows the real figures.
NODE_ALLOCATABLE = {
    "g2-standard-4": {"cpu": 3.92, "memory_gib": 12.64},  # 4 vCPU, 16 GiB
    "g2-standard-8": {"cpu": 7.91, "memory_gib": 28.34},  # 8 vCPU, 32 GiB
    "g2-standard-12": {"cpu": 11.90, "memory_gib": 43.86},  # 12 vCPU, 48 GiB
    "g2-standard-16": {"cpu": 15.89, "memory_gib": 58.90},  # 16 vCPU, 64 GiB
    "n2-standard-8": {"cpu": 7.91, "memory_gib": 28.34},  # 8 vCPU, 32 GiB
}
DAEMONSET_HEADROOM = {"cpu": 0.5, "memory_gib": 1.0}
CONSTRAINTS_HEADER = """\
# posetune's run-time dependencies as installed in the tested environment (`make test`'s .venv),
# every one pinned: the Dockerfile installs posetune with `-c cluster/constraints.txt`.
# Regenerate after changing dependencies: .venv/bin/python -m posetune.cluster.files > cluster/constraints.txt
"""


def check_cluster_file(path: str) -> str:
    """Check a cluster file; return what it describes, or raise one ConfigError listing every
    problem."""
    text = storage.read_text(path)
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:  # the parser's own message is several lines, with a caret
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{path}:{where} invalid YAML ({problem}): a cluster file is one YAML mapping "
            "(cluster/gcp.yaml) or YAML documents holding a RayJob (cluster/kuberay.yaml)"
        ) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "RayJob"]
    data = jobs[0] if jobs else (documents[0] if len(documents) == 1 else None)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a cluster file (a YAML mapping was expected)")
    if jobs:
        others = [d for d in documents if d is not data and isinstance(d, dict)]
        problems, what = rayjob_problems(data) + manifest_problems(others), "KubeRay RayJob"
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
        problems += _node_start_problems(name, node_type, config, name == head)
    problems += _image_problems(config.get("docker") or {})
    problems += _public_binding_problems(config)
    for where, command in _launcher_commands(config):
        problems += self_kill_problems(where, command)
    return problems


def _launcher_commands(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    sections = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    for section in sections:
        for i, command in enumerate(config.get(section) or []):
            yield f"{section}[{i}]", command
    for name, node_type in config["available_node_types"].items():
        for section in ("initialization_commands", "worker_setup_commands"):
            for i, command in enumerate(node_type.get(section) or []):
                yield f"available_node_types.{name}.{section}[{i}]", command


def self_kill_problems(where: str, command: str) -> list[str]:
    """`pkill -f PATTERN` (or pgrep -f) matches full command lines, the shell's own included:
    when PATTERN matches the command that contains it, the shell running it is killed (Ray's
    updater then reports the start command failed, exit 143)."""
    problems = []
    for segment in re.split(r"\|\||&&|[;|&\n]", command):
        try:
            words = shlex.split(segment)
        except ValueError:
            continue
        if not words or words[0] not in ("pkill", "pgrep") or not any(re.fullmatch(r"-\w*f\w*", w) for w in words[1:]):
            continue
        patterns = [w for w in words[1:] if not w.startswith("-")]
        if not patterns:
            continue
        try:
            matches_itself = re.search(patterns[-1], command) is not None
        except re.error:
            continue
        if matches_itself:
            problems.append(
                f"{where}: `{words[0]} -f {patterns[-1]!r}` matches its own command line, so it kills the shell "
                f"that runs it: write the pattern so it cannot match itself, e.g. "
                f"{'[' + patterns[-1][0] + ']' + patterns[-1][1:]!r}, or use a pid file"
            )
    return problems


def _node_start_problems(name: str, node_type: dict[str, Any], config: dict[str, Any], is_head: bool) -> list[str]:
    """What keeps a node from starting right: its image pull, its driver, its preemption drain."""
    where = f"available_node_types.{name}"
    node = node_type.get("node_config") or {}
    docker = {**(config.get("docker") or {}), **(node_type.get("docker") or {})}
    image = docker.get("head_image" if is_head else "worker_image") or docker.get("image") or ""
    init = node_type.get("initialization_commands", config.get("initialization_commands")) or []
    source = f"{where}.initialization_commands" if "initialization_commands" in node_type else "initialization_commands"
    problems = []
    registry = PRIVATE_REGISTRY.match(image)
    if registry and not any(REGISTRY_LOGIN.search(c) for c in init):
        problems.append(
            f"{where}: pulls the private image {image!r} but {source} log in to no registry: add "
            f"`gcloud auth configure-docker {registry.group(1)} --quiet` (and grant the node's service account "
            "roles/artifactregistry.reader)"
        )
    gpus = (node_type.get("resources") or {}).get("GPU", 0) or node.get("guestAccelerators")
    if gpus and not is_head:
        if not any("nvidia-smi" in c and re.search(r"\b(for|while|until)\b", c) for c in init):
            problems.append(
                f"{where}: no driver wait in {source}: add `for i in $(seq 120); do nvidia-smi > /dev/null 2>&1 "
                "&& break; sleep 5; done; nvidia-smi` (Ray gives the container the GPUs only if nvidia-smi works "
                "when it starts)"
            )
        options = [*(docker.get("run_options") or []), *(docker.get("worker_run_options") or [])]
        if not any(re.search(r"--gpus[= ]", o) for o in options):
            problems.append(
                f"{where}.docker.worker_run_options: no `--gpus all`: add it, so a node whose driver is missing "
                "fails to start instead of advertising GPUs its container cannot use"
            )
    if not is_head and _scheduling(node).get("provisioningModel") == "SPOT" and not _drains_on_preemption(node):
        problems.append(
            f"{where}.node_config.metadata: a spot type without a shutdown-script that runs `ray drain-node "
            "--node-id ... --reason DRAIN_NODE_REASON_PREEMPTION`: Ray Train then counts each preemption "
            "against max_failures"
        )
    for disk in node.get("disks") or []:
        params = disk.get("initializeParams") or {}
        if disk.get("boot") and not str(params.get("diskType", "")).endswith(SSD_DISK_TYPES):
            problems.append(
                f"{where}.node_config.disks.initializeParams.diskType = {params.get('diskType', 'pd-standard')!r}: "
                "a spinning boot disk slows the image pull and every start; set zones/ZONE/diskTypes/pd-balanced"
            )
    return problems


def _drains_on_preemption(node: dict[str, Any]) -> bool:
    items = (node.get("metadata") or {}).get("items") or []
    return any(
        i.get("key") == "shutdown-script"
        and "ray drain-node" in str(i.get("value"))
        and "--node-id" in str(i.get("value"))  # without it, drain-node starts a Ray driver first
        and "DRAIN_NODE_REASON_PREEMPTION" in str(i.get("value"))
        for i in items
    )


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
    problems += _entrypoint_problems(spec)
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
    where = "spec.rayClusterSpec.headGroupSpec"
    problems = []
    host = str((head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))  # KubeRay's default
    if host in LOOPBACK_HOSTS:
        problems.append(
            f"{where}.rayStartParams.dashboard-host = {host!r} binds the head pod's loopback: the head Service, "
            "the submitter and the operator cannot reach the dashboard, so the job is never submitted; set it "
            "to 0.0.0.0 (the Service stays ClusterIP: nothing is public)"
        )
    service_type = head.get("serviceType") or ((head.get("headService") or {}).get("spec") or {}).get("type")
    if service_type in PUBLIC_SERVICE_TYPES:
        problems.append(
            f"{where}.serviceType = {service_type!r} exposes the head: use ClusterIP and kubectl port-forward"
        )
    pod = (head.get("template") or {}).get("spec") or {}
    if not _avoids_spot(pod):
        problems.append(
            f"{where}.template.spec: the head may be scheduled on a spot node, and a preempted head ends the "
            "search: add a node affinity {key: cloud.google.com/gke-spot, operator: NotIn, values: ['true']}"
        )
    problems += _allocatable_problems(where, head)
    for container in _containers(head):
        for _, command in _strings(container.get("lifecycle") or {}):
            problems += self_kill_problems(f"head container {container.get('name')}", command)
    return problems


def _avoids_spot(pod: dict[str, Any]) -> bool:
    selector = pod.get("nodeSelector") or {}
    if str(selector.get("cloud.google.com/gke-spot", "")).lower() == "true":
        return False
    if str(selector.get("cloud.google.com/gke-spot", "")).lower() == "false":
        return True
    terms = (
        (((pod.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution"))
        or {}
    ).get("nodeSelectorTerms") or []
    return bool(terms) and all(
        any(
            e.get("key") == "cloud.google.com/gke-spot"
            and (
                e.get("operator") == "DoesNotExist" or (e.get("operator") == "NotIn" and "true" in e.get("values", []))
            )
            for e in term.get("matchExpressions") or []
        )
        for term in terms
    )


def _quantity(value: Any, memory: bool) -> float:
    """A Kubernetes quantity in CPUs or GiB."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if not memory:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor / 2**30
    return float(text) / 2**30


def _allocatable_problems(where: str, group: dict[str, Any]) -> list[str]:
    pod = (group.get("template") or {}).get("spec") or {}
    machine = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
    if machine not in NODE_ALLOCATABLE:
        return []
    problems = []
    for key, memory, unit in (("cpu", False, "CPUs"), ("memory", True, "GiB")):
        wanted = 0.0
        for container in _containers(group):
            resources = container.get("resources") or {}
            value = (resources.get("requests") or {}).get(key, (resources.get("limits") or {}).get(key))
            if value is not None:
                wanted += _quantity(value, memory)
        name = "memory_gib" if memory else "cpu"
        room = NODE_ALLOCATABLE[machine][name] - DAEMONSET_HEADROOM[name]
        if wanted > room:
            problems.append(
                f"{where}: its containers request {wanted:g} {unit} of {key}, more than a {machine} node offers "
                f"pods ({NODE_ALLOCATABLE[machine][name]:g} {unit} allocatable, less {DAEMONSET_HEADROOM[name]:g} for "
                f"GKE's DaemonSets): the pod would never be scheduled; request at most {room:g} {unit}"
            )
    return problems


def _entrypoint_problems(spec: dict[str, Any]) -> list[str]:
    entrypoint = " ".join(str(spec.get("entrypoint", "")).split())
    problems = []
    if "posetune search" in entrypoint and "--resume" not in entrypoint.split():
        problems.append(
            "spec.entrypoint runs `posetune search` without --resume: a retried or re-applied job would not "
            "continue the search from the bucket; add --resume"
        )
    for container in ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []:
        args = [str(a) for a in container.get("args") or []]
        if container.get("command") and "--" in args:
            submitted = " ".join(" ".join(args[args.index("--") + 1 :]).split())
            if submitted != entrypoint:
                problems.append(
                    f"spec.submitterPodTemplate container {container.get('name')}: its arguments after `--` "
                    f"({submitted!r}) are what it submits, and differ from spec.entrypoint: make them equal"
                )
    return problems


def manifest_problems(documents: list[dict[str, Any]]) -> list[str]:
    """The Kubernetes objects beside the RayJob (MLflow's Deployment, Service, volume)."""
    problems = placeholder_problems(documents)
    for doc in documents:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        spec = doc.get("spec") or {}
        if kind == "Service" and spec.get("type") in PUBLIC_SERVICE_TYPES:
            problems.append(f"Service {name}: type {spec['type']!r} exposes it: use ClusterIP and kubectl port-forward")
        if kind in ("Deployment", "StatefulSet"):
            for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
                for _, command in _strings(container.get("command") or []):
                    problems += self_kill_problems(f"{kind} {name} container {container.get('name')}", command)
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
    problems += _allocatable_problems(where, group)
    return problems


# --- The image's constraints --------------------------------------------------------------------


def runtime_constraints(project: str = "posetune") -> list[str]:
    """`name==version` for every distribution `project` needs at run time, as installed here: the
    image installs exactly the tested environment (cluster/constraints.txt)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, tuple[str, str]] = {}
    extras_seen: dict[str, set[str]] = {}
    todo = [(project, frozenset())]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and extras <= extras_seen[key]:
            continue
        found[key] = (dist.metadata["Name"], dist.version)
        extras_seen.setdefault(key, set()).update(extras)
        for line in dist.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": e} for e in (extras or {""})]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    found.pop(canonicalize_name(project))
    return [f"{found[key][0]}=={found[key][1]}" for key in sorted(found)]


if __name__ == "__main__":  # python -m posetune.cluster.files > cluster/constraints.txt
    print(CONSTRAINTS_HEADER + "\n".join(runtime_constraints()))
