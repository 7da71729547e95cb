"""cluster/: `posetune cluster check` on the shipped files and on broken variants, the head's
MLflow command as written (against the GCS emulator), and the Dockerfile."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from posetune import cli
from posetune.cluster.files import check_cluster_file
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


def write(tmp_path: Path, data: dict, name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def problems_of(tmp_path: Path, data: dict) -> list[str]:
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
    del node(c, "gpu_a100")["node_config"]["metadata"]


def _gpu_count_mismatch(c):
    node(c, "gpu_l4")["resources"]["GPU"] = 2


def _worker_without_storage_scope(c):
    node(c, "gpu_a100")["node_config"]["serviceAccounts"][0]["scopes"] = [
        "https://www.googleapis.com/auth/logging.write"
    ]


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


LAUNCHER_BREAKS = [
    (_unknown_top_level_key, r"Ray's validation: Additional properties are not allowed \('max_worker'"),
    (_gpu_without_terminate, r"gpu_l4\.node_config\.scheduling\.onHostMaintenance = 'MIGRATE': .*set it to TERMINATE"),
    (_gpu_without_driver, r"gpu_a100\.node_config\.metadata: no install-nvidia-driver item"),
    (_gpu_count_mismatch, r"gpu_l4\.resources\.GPU = 2, but node_config\.guestAccelerators attach 1 GPU"),
    (_worker_without_storage_scope, r"gpu_a100\.node_config\.serviceAccounts: no service account with a storage"),
    (_preemptible_head, r"head\.node_config\.scheduling: the head node is preemptible"),
    (_image_of_another_ray, rf"docker\.image = .* runs Ray 2\.40\.0 but this machine runs Ray {re.escape(RAY)}"),
    (_public_dashboard, r"head_start_ray_commands\[2\]: --dashboard-host 0\.0\.0\.0 listens on every interface"),
    (_public_mlflow, r"head_start_ray_commands\[3\]: --host 0\.0\.0\.0 listens on every interface"),
    (_image_family, r"gpu_l4\.node_config\.disks\.sourceImage = .* is an image family"),
    (_placeholder_left, r"YOUR_PROJECT_ID is not set \(provider\.project_id\)"),
]


@pytest.mark.parametrize(("break_it", "message"), LAUNCHER_BREAKS, ids=[b.__name__[1:] for b, _ in LAUNCHER_BREAKS])
def test_broken_launcher_files_fail_with_one_line_each(break_it, message, tmp_path):
    config = gcp()
    break_it(config)
    problems = problems_of(tmp_path, config)
    assert len(problems) == 1, problems  # exactly the one thing that was broken
    assert re.search(message, problems[0]), problems[0]


def rayjob() -> dict:
    return yaml.safe_load(filled("kuberay.yaml"))


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
]


@pytest.mark.parametrize(("break_it", "message"), RAYJOB_BREAKS, ids=[b.__name__[1:] for b, _ in RAYJOB_BREAKS])
def test_broken_rayjobs_fail_with_one_line_each(break_it, message, tmp_path):
    job = rayjob()
    break_it(job)
    problems = problems_of(tmp_path, job)
    assert any(re.search(message, p) for p in problems), problems
    # A misspelt field also leaves the real one unset, which is then a second, true problem.
    assert len(problems) <= 2, problems


def test_not_a_cluster_file(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n")
    assert cli.main(["cluster", "check", str(path)]) == 2
    assert "neither a Ray cluster-launcher file" in capsys.readouterr().err


# --- MLflow on the head ------------------------------------------------------------------------


def mlflow_command(text: str) -> list[str]:
    """The head's `mlflow server ...` command, as the cluster file writes it."""
    config = yaml.safe_load(text)
    (command,) = [c for c in config["head_start_ray_commands"] if c.startswith("nohup mlflow server")]
    return shlex.split(command.split(">")[0].removeprefix("nohup "))


def test_both_cluster_files_start_the_same_mlflow_server():
    job = yaml.safe_load(filled("kuberay.yaml"))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    script = head["lifecycle"]["postStart"]["exec"]["command"][-1]
    in_kuberay = shlex.split(script.split("&&", 1)[1].split(">")[0].replace("nohup", "", 1))
    assert in_kuberay == mlflow_command(filled("gcp.yaml"))
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://127.0.0.1:5000"} in head["env"]
    gcp_options = yaml.safe_load(filled("gcp.yaml"))["docker"]["head_run_options"]
    assert "--env MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in gcp_options


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
    server = subprocess.Popen(command, stdout=log, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the head's MLflow server did not start"
                time.sleep(1)
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
        server.terminate()
        server.wait(timeout=30)
        log.close()


# --- The cluster image -------------------------------------------------------------------------


def test_dockerfile_base_matches_the_resolved_ray_and_python():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
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
