"""The node types an autoscaler may start, read from a source Ray 2.60 really provides.

A plan that sees only the nodes up now refuses a search on a head-only cluster (GPU types at
``min_workers: 0``) and never asks for GPUs, so the autoscaler never starts any. Ray has no
public API for "what could this cluster grow to", and the GCS key the autoscaler was meant to
publish it under is never written by Ray 2.60 (neither the v1 monitor nor the v2 autoscaler calls
``ReportClusterConfig``). So the node types come from the first of:

1. the search file's ``resources.node_types`` (the user's override, any cluster);
2. Ray's GCS cluster config, where a later Ray writes it;
3. ``~/ray_bootstrap_config.yaml``, the resolved cluster file `ray up` leaves on the head (the v1
   and the v2 autoscaler both read it), through Ray's own ``prepare_config``;
4. on KubeRay (the operator sets ``RAY_CLUSTER_NAME`` in every Ray container), the RayCluster
   resource from the Kubernetes API, translated by Ray's own KubeRay config code, as the
   autoscaler sidecar does.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from posetune import internals
from posetune.errors import ConfigError

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # `ray up` writes it on the head (ray.autoscaler.commands)
KUBE_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class NodeType:
    """One worker node type: what one node offers Ray, and how many the autoscaler may run."""

    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int


@dataclass(frozen=True)
class Autoscaler:
    """What an autoscaler may start: worker node types and the cluster-wide cap on workers."""

    node_types: tuple[NodeType, ...]
    max_workers: int  # worker nodes in all, whatever their types (the cluster file's max_workers)
    source: str  # where it was read, for the plan's description

    def describe(self) -> str:
        types = ", ".join(
            f"{t.name} x{t.min_workers}-{t.max_workers} {format_resources(t.resources)}" for t in self.node_types
        )
        return f"{types or 'no worker types'}; at most {self.max_workers} worker node(s) (from {self.source})"


def from_launcher_config(config: dict[str, Any], source: str) -> Autoscaler | None:
    """A cluster-launcher (or Ray's KubeRay-translated) config's worker types, head excluded."""
    head = config.get("head_node_type")
    types = tuple(
        NodeType(
            name,
            {key: float(value) for key, value in (spec.get("resources") or {}).items()},
            int(spec.get("min_workers", 0)),
            int(spec.get("max_workers", 0)),
        )
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    )
    if not types:
        return None
    cap = config.get("max_workers")
    return Autoscaler(types, int(cap) if cap is not None else sum(t.max_workers for t in types), source)


def from_gcs() -> Autoscaler | None:
    """The cluster config in Ray's GCS (written by no Ray up to 2.60; kept for later ones)."""
    config = internals.autoscaler_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    types = tuple(
        NodeType(
            group.name,
            {key: float(value) for key, value in group.resources.items()},
            int(group.min_count),
            int(group.max_count) if group.max_count >= 0 else 1000,  # -1: unlimited
        )
        for group in config.node_group_configs
    )
    return Autoscaler(types, sum(t.max_workers for t in types), "Ray's GCS cluster config")


def from_bootstrap_file(path: str = BOOTSTRAP_CONFIG) -> Autoscaler | None:
    """The node types of the cluster file `ray up` left on this (head) node."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        config = internals.prepared_cluster_config(yaml.safe_load(file.read_text()))
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{file} (the cluster file `ray up` left on the head) cannot be read: {exc}; "
            "fix it, or give the node types in the search file (resources.node_types)"
        ) from exc
    return from_launcher_config(config, str(path))


def from_kuberay() -> Autoscaler | None:
    """On KubeRay, the RayCluster resource's worker groups, as Ray's autoscaler sidecar reads them
    (the head pod's service account needs `get` on rayclusters, as the sidecar does)."""
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name or not os.path.isfile(KUBE_NAMESPACE_FILE):
        return None
    namespace = Path(KUBE_NAMESPACE_FILE).read_text().strip()
    try:
        config = internals.kuberay_autoscaling_config(name, namespace)
    except Exception as exc:  # any failure of the Kubernetes API: the plan falls back to nodes up
        log.warning(
            "could not read RayCluster %s/%s from the Kubernetes API (%s): the plan sees only the nodes up; "
            "give the node types in the search file (resources.node_types) to plan for the autoscaler",
            namespace,
            name,
            exc,
        )
        return None
    return from_launcher_config(config, f"RayCluster {namespace}/{name}")


def find_autoscaler(explicit: Autoscaler | None = None) -> Autoscaler | None:
    """The first source that answers (the module docstring's order), or None: no autoscaler."""
    if explicit is not None:
        return explicit
    for source in (from_gcs, from_bootstrap_file, from_kuberay):
        found = source()
        if found is not None:
            return found
    return None


MEMORY_RESOURCES = ("memory", "object_store_memory")  # bytes


def format_resources(resources: dict[str, float]) -> str:
    """{CPU: 8, GPU: 1, memory: 30 GiB} and custom resources, without Ray's node:... ones or zeros."""
    shown = {k: v for k, v in resources.items() if not k.startswith("node:") and not math.isclose(v, 0)}
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(shown.items())) + "}"


def _amount(key: str, value: float) -> str:
    return f"{value / 2**30:.3g} GiB" if key in MEMORY_RESOURCES else f"{value:g}"
