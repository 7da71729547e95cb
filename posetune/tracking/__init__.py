"""MLflow tracking: a listener of the search's events (a parent run, one child per trial), training
runs, the model registry and `posetune ui`. No Ray."""
