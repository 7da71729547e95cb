"""Logging set-up for every Ray worker process of a search (Ray's `worker_process_setup_hook`).

Ray imports this module in each of its worker processes (trial drivers, Ray Train's controller
and helper actors, training workers) before they run anything, so it imports only the standard
library: `import posetune` is lazy and torch is not loaded here.
"""

from __future__ import annotations

import logging

# Routine messages Ray logs at WARNING that read like failures in a search's output.
ROUTINE_WARNINGS = (
    # After every trial: Ray Train's clean-up of the trial's placement group, which is how a
    # Tune-managed trial ends, not a crash.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)


def quiet_ray_internals() -> None:
    for name in ROUTINE_WARNINGS:
        logging.getLogger(name).setLevel(logging.ERROR)
