"""The Python API (`posetune/__init__.py`): the README's "From Python" snippet run for real on a
tiny space, the registries' `list_*`, and the flat layout's names resolving without Ray."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import posetune
from posetune import choices
from posetune.search.events import Outcome, SearchStarted

from helpers import REPO, tiny_space


def readme_snippet() -> str:
    """The python block of README.md's "## From Python" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_snippet_runs_a_tracked_search(synth_small, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where the snippet's runs go: an empty store
    budget = {"max_samples": 96, "grace_samples": 96, "reduction_factor": 2}
    space_file = tiny_space(tmp_path, synth_small, name="readme", search__asha=budget)
    code = readme_snippet()
    assert '"search_spaces/quick.yaml"' in code and '"search.num_samples=4"' in code
    code = code.replace('"search_spaces/quick.yaml"', repr(str(space_file)))
    code = code.replace('"search.num_samples=4"', '"search.num_samples=2"')  # a shorter search, same calls
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    summary, run = namespace["summary"], namespace["run"]
    out = capsys.readouterr().out
    assert "dry run" not in out and "search space (2 parameters):" in out  # plan_search's lines
    assert f"2 trials in {summary.seconds / 60:.1f} min" in out  # summary_lines
    assert summary.counts[Outcome.FAILED] == 0 and summary.best is not None
    assert out.strip().splitlines()[-1].startswith(summary.best.id)
    assert run.uri == uri and run.unlogged == []

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("readme")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("posetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["posetune.best_trial"] == summary.best.id
    assert sorted(r.data.tags["posetune.trial_id"] for r in children) == sorted(r.id for r in summary.records)
    assert all(r.info.status == "FINISHED" for r in children)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "search_space")]
    assert artifacts == ["search_space/readme.yaml"]


def test_open_search_run_is_a_no_op_listener_without_tracking(synth_small, tmp_path):
    space, _ = posetune.load_space(tiny_space(tmp_path, synth_small), ["tracking.enabled=false"])
    with posetune.open_search_run(space) as run:
        run.on_event(SearchStarted(str(tmp_path), resume=False))
    assert run.uri is None and run.unlogged == []
    assert not (tmp_path / "runs" / "t" / "tracking.json").exists()


def test_every_registry_lists_its_names():
    assert posetune.list_backbones() == sorted(choices.BACKBONES)
    assert posetune.list_orientation_losses() == sorted(choices.ORIENTATION_LOSSES)
    assert posetune.list_schedules() == sorted(choices.SCHEDULES)
    assert posetune.list_samplers() == sorted(choices.SEARCHERS)
    assert posetune.list_schedulers() == sorted(choices.SCHEDULERS)
    assert {"gs", "https"} <= set(posetune.list_storage_schemes())
    assert sorted(posetune.__all__) == sorted(posetune._EXPORTS)
    for name in posetune.__all__:
        assert getattr(posetune, name) is not None


def test_flat_layout_names_resolve_without_importing_ray_or_mlflow():
    """Searches saved before the package layout pickled posetune.search.TrialEvents and
    posetune.search._trial_dirname; code imported posetune.tracking.SearchRun and
    posetune.results.TrialEnded (search/legacy.py maps that module to search.results)."""
    code = (
        "import sys\n"
        "import posetune.search, posetune.tracking, posetune.search.results as results\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "assert not heavy, heavy\n"
        "from posetune.search.events import TrialEnded\n"
        "from posetune.tracking.store import mlflow_client\n"
        "from posetune.tracking.runs import SearchRun\n"
        "assert results.TrialEnded is TrialEnded and posetune.tracking.SearchRun is SearchRun\n"
        "assert posetune.tracking._client is mlflow_client\n"
        "assert 'ray' not in sys.modules\n"
        "import posetune.search.run as run\n"
        "assert posetune.search.TrialEvents is run.TrialEvents\n"
        "assert posetune.search._trial_dirname is run._trial_dirname\n"
        "import pickle\n"  # what unpickling a saved Tuner does with the old path
        "assert pickle.loads(b'cposetune.search\\nTrialEvents\\n.') is run.TrialEvents\n"
        "from posetune.search.legacy import alias_flat_layout, loads\n"
        "assert loads(b'cposetune.results\\nTrialEnded\\n.') is TrialEnded and 'posetune.results' not in sys.modules\n"
        "alias_flat_layout()\n"
        "assert pickle.loads(b'cposetune.results\\nTrialEnded\\n.') is TrialEnded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
