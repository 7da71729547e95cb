"""cluster/: `posetune cluster check` on the shipped files and on broken variants (each built in
memory from the shipped file), Ray's own KubeRay translation of kuberay.yaml, the MLflow commands
as written (against the GCS emulator), the self-kill rule on a real shell, the Dockerfile and its
constraints."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from posetune import cli
from posetune.cluster.files import NODE_ALLOCATABLE, check_cluster_file, self_kill_problems
from posetune.errors import ConfigError

from helpers import REPO, free_port

TEST_VALUES = {
    "YOUR_PROJECT_ID": "my-project",
    "YOUR_REGION": "us-central1",
    "YOUR_ZONE": "us-central1-a",
    "YOUR_BUCKET": "my-bucket",
}
RAY = metadata.version("ray")


def filled(name: str, values: dict[str, str] = TEST_VALUES) -> str:
    """A shipped cluster file with its placeholders set, as a user sets them."""
    text = (REPO / "cluster" / name).read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def write(tmp_path: Path, data: dict | list[dict], name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(data if isinstance(data, list) else [data], sort_keys=False))
    return str(path)


def problems_of(tmp_path: Path, data: dict | list[dict]) -> list[str]:
    """The lines of `posetune cluster check`'s error for a cluster file holding `data`."""
    with pytest.raises(ConfigError) as caught:
        check_cluster_file(write(tmp_path, data))
    return str(caught.value).splitlines()[1:]


@pytest.mark.parametrize("name", ["gcp.yaml", "kuberay.yaml"])
def test_shipped_files_pass_once_their_placeholders_are_set(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(filled(name))
    assert cli.main(["cluster", "check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    # As shipped, every placeholder is named with what to put there.
    assert cli.main(["cluster", "check", str(REPO / "cluster" / name)]) == 2
    err = capsys.readouterr().err
    assert "YOUR_PROJECT_ID is not set" in err and "replace it with your GCP project id" in err
    assert "YOUR_BUCKET is not set" in err and "Traceback" not in err


def gcp() -> dict:
    return yaml.safe_load(filled("gcp.yaml"))


def node(config: dict, name: str) -> dict:
    return config["available_node_types"][name]


def _unknown_top_level_key(c):
    c["max_worker"] = 3


def _gpu_without_terminate(c):
    node(c, "gpu_l4")["node_config"]["scheduling"]["onHostMaintenance"] = "MIGRATE"


def _gpu_without_driver(c):
    items = node(c, "gpu_l4")["node_config"]["metadata"]["items"]
    items[:] = [i for i in items if i["key"] != "install-nvidia-driver"]


def _gpu_count_mismatch(c):
    node(c, "gpu_l4")["resources"]["GPU"] = 2


def _worker_without_storage_scope(c):
    node(c, "gpu_l4")["node_config"]["serviceAccounts"][0]["scopes"] = ["https://www.googleapis.com/auth/logging.write"]


def _preemptible_head(c):
    node(c, "head")["node_config"]["scheduling"] = {"provisioningModel": "SPOT", "onHostMaintenance": "TERMINATE"}


def _image_of_another_ray(c):
    c["docker"]["image"] = "rayproject/ray:2.40.0-py311-gpu"


def _public_dashboard(c):
    c["head_start_ray_commands"][2] = c["head_start_ray_commands"][2].replace("127.0.0.1", "0.0.0.0")


def _public_mlflow(c):
    c["head_start_ray_commands"][3] = c["head_start_ray_commands"][3].replace("--host 127.0.0.1", "--host 0.0.0.0")


def _image_family(c):
    disk = node(c, "gpu_l4")["node_config"]["disks"][0]
    disk["initializeParams"]["sourceImage"] = "projects/deeplearning-platform-release/global/images/family/common-cu124"


def _placeholder_left(c):
    c["provider"]["project_id"] = "YOUR_PROJECT_ID"


def _pkill_matching_itself(c):
    """Failure mode 1: the pattern is on the shell's own command line."""
    c["head_start_ray_commands"][1] = 'pkill -f "mlflow server" || true'


def _private_image_without_login(c):
    """Failure mode 2: nothing configures docker's credential helper before the pull."""
    c["initialization_commands"] = [cmd for cmd in c["initialization_commands"] if "configure-docker" not in cmd]


def _gpu_type_without_driver_wait(c):
    """Failure mode 4: the container starts before the driver answers."""
    init = node(c, "gpu_l4")["initialization_commands"]
    init[:] = [cmd for cmd in init if "nvidia-smi" not in cmd]


def _gpu_type_without_gpus_all(c):
    del node(c, "gpu_l4")["docker"]


def _spot_type_without_drain(c):
    items = node(c, "gpu_l4")["node_config"]["metadata"]["items"]
    items[:] = [i for i in items if i["key"] != "shutdown-script"]


def _spinning_boot_disk(c):
    del node(c, "gpu_l4")["node_config"]["disks"][0]["initializeParams"]["diskType"]


LAUNCHER_BREAKS = [
    (_unknown_top_level_key, r"Ray's validation: Additional properties are not allowed \('max_worker'"),
    (_gpu_without_terminate, r"gpu_l4\.node_config\.scheduling\.onHostMaintenance = 'MIGRATE': .*set it to TERMINATE"),
    (_gpu_without_driver, r"gpu_l4\.node_config\.metadata: no install-nvidia-driver item"),
    (_gpu_count_mismatch, r"gpu_l4\.resources\.GPU = 2, but node_config\.guestAccelerators attach 1 GPU"),
    (_worker_without_storage_scope, r"gpu_l4\.node_config\.serviceAccounts: no service account with a storage"),
    (_preemptible_head, r"head\.node_config\.scheduling: the head node is preemptible"),
    (_image_of_another_ray, rf"docker\.image = .* runs Ray 2\.40\.0 but this machine runs Ray {re.escape(RAY)}"),
    (_public_dashboard, r"head_start_ray_commands\[2\]: --dashboard-host 0\.0\.0\.0 listens on every interface"),
    (_public_mlflow, r"head_start_ray_commands\[3\]: --host 0\.0\.0\.0 listens on every interface"),
    (_image_family, r"gpu_l4\.node_config\.disks\.sourceImage = .* is an image family"),
    (_placeholder_left, r"YOUR_PROJECT_ID is not set \(provider\.project_id\)"),
    (
        _pkill_matching_itself,
        r"head_start_ray_commands\[1\]: `pkill -f 'mlflow server'` matches its own command line.*'\[m\]lflow server'",
    ),
    (
        _private_image_without_login,
        r"available_node_types\.head: pulls the private image .* but initialization_commands log in to no registry: "
        r"add `gcloud auth configure-docker us-central1-docker\.pkg\.dev --quiet`",
    ),
    (_gpu_type_without_driver_wait, r"gpu_l4: no driver wait in available_node_types\.gpu_l4\.initialization_commands"),
    (_gpu_type_without_gpus_all, r"gpu_l4\.docker\.worker_run_options: no `--gpus all`"),
    (_spot_type_without_drain, r"gpu_l4\.node_config\.metadata: a spot type without a shutdown-script .*PREEMPTION"),
    (_spinning_boot_disk, r"gpu_l4\.node_config\.disks\.initializeParams\.diskType = 'pd-standard'"),
]


@pytest.mark.parametrize(("break_it", "message"), LAUNCHER_BREAKS, ids=[b.__name__[1:] for b, _ in LAUNCHER_BREAKS])
def test_broken_launcher_files_fail_with_one_line_each(break_it, message, tmp_path):
    config = gcp()
    break_it(config)
    problems = problems_of(tmp_path, config)
    assert len(problems) == 1, problems  # exactly the one thing that was broken
    assert re.search(message, problems[0]), problems[0]


def kuberay() -> list[dict]:
    """kuberay.yaml's documents: the RayJob, then MLflow's volume claim, Deployment and Service."""
    return list(yaml.safe_load_all(filled("kuberay.yaml")))


def rayjob() -> dict:
    return kuberay()[0]


def manifest(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def head_group(j: dict) -> dict:
    return j["spec"]["rayClusterSpec"]["headGroupSpec"]


def worker_group(j: dict) -> dict:
    return j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_group_without_name(j):
    del j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


def _ttl_without_shutdown(j):
    j["spec"]["shutdownAfterJobFinishes"] = False


def _min_above_max(j):
    group = j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"], group["replicas"] = 4, 2, 2


def _long_name(j):
    j["metadata"]["name"] = "posetune-search-of-the-reference-scene-with-every-backbone"


def _misspelt_field(j):
    j["spec"]["shutdownAfterJobFinish"] = j["spec"].pop("shutdownAfterJobFinishes")


def _gpu_group_without_toleration(j):
    del j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"]


def _other_ray_version(j):
    j["spec"]["rayClusterSpec"]["rayVersion"] = "2.40.0"


def _loopback_dashboard(j):
    """Failure mode 5: the head Service cannot reach a dashboard on the pod's loopback."""
    head_group(j)["rayStartParams"]["dashboard-host"] = "127.0.0.1"


def _public_head_service(j):
    head_group(j)["serviceType"] = "LoadBalancer"


def _requests_above_allocatable(j):
    worker = worker_group(j)["template"]["spec"]["containers"][0]
    worker["resources"]["requests"]["memory"] = worker["resources"]["limits"]["memory"] = "28Gi"


def _head_on_spot(j):
    del head_group(j)["template"]["spec"]["affinity"]


def _entrypoint_without_resume(j):
    j["spec"]["entrypoint"] = j["spec"]["entrypoint"].replace(" --resume", "")
    submitter = j["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    submitter["args"] = [a.replace(" --resume", "") for a in submitter["args"]]


def _submitter_submits_something_else(j):
    submitter = j["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    submitter["args"][-1] = submitter["args"][-1].replace("default.yaml", "quick.yaml")


def _pkill_in_head_hook(j):
    head = head_group(j)["template"]["spec"]["containers"][0]
    head["lifecycle"] = {"postStart": {"exec": {"command": ["/bin/sh", "-c", 'pkill -f "mlflow server"; true']}}}


RAYJOB_BREAKS = [
    (
        _worker_group_without_name,
        r"RayJob schema: spec\.rayClusterSpec\.workerGroupSpecs\.0: 'groupName' is a required",
    ),
    (_ttl_without_shutdown, r"spec\.ttlSecondsAfterFinished = 3600 needs spec\.shutdownAfterJobFinishes: true"),
    (_min_above_max, r"workerGroupSpecs\[0\] \(gpu-l4\): minReplicas = 4 > maxReplicas = 2"),
    (_long_name, r"metadata\.name = .*: must be a DNS-1035 label .* at most 47 characters"),
    (_misspelt_field, r"spec\.shutdownAfterJobFinish: unknown field; did you mean shutdownAfterJobFinishes\?"),
    (_gpu_group_without_toleration, r"\(gpu-l4\): asks for nvidia\.com/gpu but tolerates no nvidia\.com/gpu taint"),
    (_other_ray_version, rf"rayVersion = '2\.40\.0': set it to '{re.escape(RAY)}'"),
    (_loopback_dashboard, r"dashboard-host = '127\.0\.0\.1' binds the head pod's loopback: .* set it to 0\.0\.0\.0"),
    (_public_head_service, r"headGroupSpec\.serviceType = 'LoadBalancer' exposes the head"),
    (
        _requests_above_allocatable,
        r"\(gpu-l4\): its containers request 28 GiB of memory, more than a g2-standard-8 node offers pods",
    ),
    (_head_on_spot, r"headGroupSpec\.template\.spec: the head may be scheduled on a spot node"),
    (_entrypoint_without_resume, r"spec\.entrypoint runs `posetune search` without --resume"),
    (_submitter_submits_something_else, r"submitterPodTemplate container submitter: its arguments after `--`"),
    (_pkill_in_head_hook, r"head container ray-head: `pkill -f 'mlflow server'` matches its own command line"),
]


@pytest.mark.parametrize(("break_it", "message"), RAYJOB_BREAKS, ids=[b.__name__[1:] for b, _ in RAYJOB_BREAKS])
def test_broken_rayjobs_fail_with_one_line_each(break_it, message, tmp_path):
    docs = kuberay()
    break_it(docs[0])
    problems = problems_of(tmp_path, docs)
    assert any(re.search(message, p) for p in problems), problems
    # A misspelt field also leaves the real one unset, which is then a second, true problem.
    assert len(problems) <= 2, problems


def test_a_public_mlflow_service_is_flagged(tmp_path):
    docs = kuberay()
    manifest(docs, "Service")["spec"]["type"] = "NodePort"
    assert [p.strip() for p in problems_of(tmp_path, docs)] == [
        "Service posetune-mlflow: type 'NodePort' exposes it: use ClusterIP and kubectl port-forward"
    ]


def test_kuberay_node_types_as_rays_own_translation_derives_them():
    """What the KubeRay autoscaler (and a plan built on its translation) sees: a head that takes
    the trial drivers and no training, and GPU workers from zero, one 6-CPU trial worker each."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    spec = rayjob()["spec"]["rayClusterSpec"]
    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "posetune-search-x1", "namespace": "default"}, "spec": spec}
    )
    types = config["available_node_types"]
    assert set(types) == {"headgroup", "gpu-l4"} and config["head_node_type"] == "headgroup"
    assert {k: v for k, v in types["headgroup"]["resources"].items() if k != "memory"} == {
        "CPU": 2,
        "posetune_driver": 1,
    }
    worker = types["gpu-l4"]
    assert {k: v for k, v in worker["resources"].items() if k != "memory"} == {"CPU": 6, "GPU": 1}
    assert (worker["min_workers"], worker["max_workers"], config["max_workers"]) == (0, 8, 8)
    # Its memory is the container's limit, within what the node offers pods.
    assert worker["resources"]["memory"] / 2**30 <= NODE_ALLOCATABLE["g2-standard-8"]["memory_gib"]


def test_kuberay_runs_and_keeps_what_a_search_needs():
    docs = kuberay()
    job, claim, deployment, service = docs
    spec = job["spec"]
    # Retried on a new cluster, the same entrypoint continues the search (--resume), submitted
    # by the small submitter image with Ray's token.
    assert "--resume" in spec["entrypoint"].split() and spec["backoffLimit"] >= 1
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["image"].startswith("quay.io/kuberay/submitter:")
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # MLflow outlives the job: a Deployment (restarted by Kubernetes) whose SQLite store is on
    # the claim, reached by the head through the Service.
    assert claim["kind"] == "PersistentVolumeClaim" and deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    store = next(a for a in container["command"] if a.startswith("--backend-store-uri="))
    assert store.split("=", 1)[1].startswith(f"sqlite:///{mount['mountPath']}/")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (head,) = head_group(job)["template"]["spec"]["containers"]
    port = service["spec"]["ports"][0]["port"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": f"http://{service['metadata']['name']}:{port}"} in head["env"]
    assert "lifecycle" not in head  # no server dies with the head any more


def test_self_kill_rule_on_a_real_shell(tmp_path):
    """Failure mode 1, on a real shell: `pkill -f PATTERN` kills the shell whose command line
    holds PATTERN; the bracketed form does not match itself. A unique pattern so that nothing
    else on this machine is hit."""
    if shutil.which("pkill") is None:
        pytest.skip("no pkill here")
    probe = f"posetune-selfkill-probe-{tmp_path.name}"
    for pattern, survives in ((probe, False), (f"[{probe[0]}]{probe[1:]}", True)):
        command = f'pkill -f "{pattern}" || true; echo alive'
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert ("alive" in done.stdout) is survives, (pattern, done)
        assert bool(self_kill_problems("cmd", command)) is not survives
    # The shipped start command is the bracketed form.
    assert 'pkill -f "[m]lflow server" || true' in gcp()["head_start_ray_commands"]


def test_not_a_cluster_file(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n")
    assert cli.main(["cluster", "check", str(path)]) == 2
    assert "neither a Ray cluster-launcher file" in capsys.readouterr().err


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    """Found by trying posetune as a new user: a broken file was a yaml traceback, exit 1."""
    path = tmp_path / "broken.yaml"
    path.write_text("provider:\n  type: gcp\n  region: [us-central1\nmax_workers: 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "posetune", "cluster", "check", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"posetune: error: {path}: line 4, column 12: invalid YAML (")
    assert "a cluster file is one YAML mapping (cluster/gcp.yaml)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


# --- MLflow on the head ------------------------------------------------------------------------


def mlflow_command(text: str) -> list[str]:
    """The head's `mlflow server ...` command, as the cluster file writes it."""
    config = yaml.safe_load(text)
    (command,) = [c for c in config["head_start_ray_commands"] if c.startswith("nohup mlflow server")]
    return shlex.split(command.split(">")[0].removeprefix("nohup "))


def wait_healthy(uri: str, server: subprocess.Popen, log: Path, what: str) -> None:
    """Until the MLflow server at uri answers /health (it dies, or 300 s pass: the test fails;
    make test runs these tests at a low priority beside the Ray tests)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                assert response.status == 200
            return
        except OSError:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """The server and its workers (its own process group); killed if SIGTERM is not enough
    within a minute (a loaded 2-core machine can take that long)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def kuberay_mlflow_command() -> list[str]:
    deployment = manifest(kuberay(), "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def test_both_cluster_files_keep_mlflow_artifacts_in_the_same_place():
    gcp_command = mlflow_command(filled("gcp.yaml"))
    destination = gcp_command[gcp_command.index("--artifacts-destination") + 1]
    assert f"--artifacts-destination={destination}" in kuberay_mlflow_command()
    gcp_options = yaml.safe_load(filled("gcp.yaml"))["docker"]["head_run_options"]
    assert "--env MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in gcp_options


@pytest.mark.server
def test_kuberay_mlflow_answers_through_its_service_name(tmp_path):
    """The Deployment's command as written (loopback and a free port for the pod's address and
    5000, a temporary folder for the volume, a local artifact root): MLflow answers a client
    that calls it by the Service's name, which its default host check would refuse."""
    port = free_port()
    command = [
        arg.replace("--host=0.0.0.0", "--host=127.0.0.1")
        .replace("--port=5000", f"--port={port}")
        .replace("/mlflow/", f"{tmp_path}/")
        .replace("gs://my-bucket/mlflow", str(tmp_path / "artifacts"))
        for arg in kuberay_mlflow_command()
    ]
    command[0] = str(Path(sys.executable).parent / "mlflow")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, tmp_path / "server.log", "the MLflow Deployment's command")
        for host, allowed in (("posetune-mlflow:5000", True), ("localhost:5000", True), ("evil.example:5000", False)):
            request = urllib.request.Request(url, headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    status = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            assert (status == 200) is allowed, (host, status)
        assert (tmp_path / "mlflow.db").exists()  # the store on the volume
    finally:
        stop(server)
        log.close()


def test_head_mlflow_command_serves_on_loopback_with_artifacts_in_the_bucket(gcs, bucket, tmp_path):
    """The command as written, with the emulator's bucket for the real one, a temporary folder
    for the head's disk and a free port for 5000."""
    from mlflow import MlflowClient

    port = free_port()
    command = mlflow_command(filled("gcp.yaml", {**TEST_VALUES, "YOUR_BUCKET": bucket}))
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5000"
    command[command.index("--port") + 1] = str(port)
    command = [arg.replace("/home/ray/mlflow", str(tmp_path)) for arg in command]
    command[0] = str(Path(sys.executable).parent / "mlflow")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, tmp_path / "server.log", "the head's MLflow server")
        with urllib.request.urlopen(uri, timeout=10) as response:  # the UI
            assert b"<html" in response.read().lower()
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("head"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # through the server's proxy
        names = gcs.names(bucket, "mlflow/")
        assert any(name.endswith(f"{run.info.run_id}/artifacts/note.txt") for name in names), names
        assert (tmp_path / "mlflow.db").exists()  # the backend store on the head's disk
    finally:
        stop(server)
        log.close()


# --- The cluster image -------------------------------------------------------------------------


# The NVIDIA driver branch each CUDA release needs at least (NVIDIA's CUDA toolkit release notes,
# table "CUDA Toolkit and Corresponding Driver Versions": 12.4 >= 550, 12.6 >= 560, 12.8 >= 570,
# 12.9 >= 575, 13.0 >= 580).
MIN_DRIVER = {"12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}


def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(REPO / "Dockerfile"))


def test_dockerfile_base_matches_the_resolved_ray_and_python():
    parser = dockerfile()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert parser.baseimage == f"rayproject/ray:{RAY}-{python}-gpu"
    instructions = [i["instruction"] for i in parser.structure]
    assert instructions.count("FROM") == 1 and "RUN" in instructions
    text = " ".join(i["value"] for i in parser.structure if i["instruction"] != "COMMENT")
    assert not re.search(r"(?i)(secret|token|password|credential|\.json\b|GOOGLE_APPLICATION)", text)
    # The shipped cluster files use an image tagged with the same Ray version.
    assert f"-ray{RAY}" in yaml.safe_load(filled("gcp.yaml"))["docker"]["image"]
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!posetune/" in ignored  # only what the image needs is sent
    assert "!cluster/constraints.txt" in ignored


def test_dockerfile_pins_the_tested_torch_and_the_node_image_driver_runs_it():
    """Failure mode 4: torch exact, its CUDA asserted at build time, and the node image's driver
    branch new enough for that CUDA."""
    import torch
    import torchvision

    runs = " ".join(i["value"] for i in dockerfile().structure if i["instruction"] == "RUN")
    pins = dict(re.findall(r"\b(torch|torchvision)==(\S+)", runs))
    assert pins == {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}
    (cuda,) = re.findall(r"torch\.version\.cuda == '([\d.]+)'", runs)
    assert cuda == torch.version.cuda  # the image's torch is the build tested here
    for name, spec in gcp()["available_node_types"].items():
        for disk in spec["node_config"]["disks"]:
            image = disk["initializeParams"]["sourceImage"]
            driver = re.search(r"-nvidia-(\d+)-v\d{8}$", image)
            assert driver, f"{name}: {image} names no driver branch"
            assert int(driver.group(1)) >= MIN_DRIVER[cuda], (name, image, cuda)


def test_image_installs_the_tested_versions_from_the_constraints_file():
    from posetune.cluster.files import CONSTRAINTS_HEADER

    text = (REPO / "cluster" / "constraints.txt").read_text()
    assert text.startswith(CONSTRAINTS_HEADER)
    pinned = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    names = {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pinned.items()}
    runs = " ".join(i["value"] for i in dockerfile().structure if i["instruction"] == "RUN")
    assert "-c cluster/constraints.txt ." in runs
    assert names["ray"] == RAY
    assert names["torch"] == re.search(r"torch==(\S+)", runs).group(1)
    assert names["torchvision"] == re.search(r"torchvision==(\S+)", runs).group(1)
    # Every run-time dependency posetune declares is pinned (its own dependencies are too: the
    # file is generated from the installed closure, see its header).
    declared = metadata.requires("posetune") or []
    for requirement in declared:
        if "extra ==" in requirement:
            continue
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in names, f"{name} is not pinned in cluster/constraints.txt"
