"""Study-level plots of a search, made with Optuna's own visualisation on the search's study.

PNGs (Optuna's matplotlib backend) for what the MLflow UI previews inline: optimisation
history, hyperparameter importance and every trial's learning curve (intermediate values,
reported at step = samples seen). Parallel coordinates also as interactive HTML (plotly).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

PNG_PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "learning_curves.png": "plot_intermediate_values",
    "parallel_coordinate.png": "plot_parallel_coordinate",
}


def study_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Write the plots into folder; return why any could not be drawn (e.g. too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_matplotlib
    from optuna.visualization import plot_parallel_coordinate

    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for filename, name in PNG_PLOTS.items():
            try:
                axes = getattr(optuna_matplotlib, name)(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.set_size_inches(10, 6)
                figure.savefig(folder / filename, dpi=100, bbox_inches="tight")
                plt.close(figure)
            except Exception as exc:  # e.g. importance needs two complete trials
                problems.append(f"{filename}: {str(exc).splitlines()[0]}")
        try:
            plot_parallel_coordinate(study).write_html(folder / "parallel_coordinate.html", include_plotlyjs=True)
        except Exception as exc:
            problems.append(f"parallel_coordinate.html: {str(exc).splitlines()[0]}")
    return problems
