"""The multi-fidelity Hartmann functions of mf-prior-bench (mfh3, mfh6), ported.

Ported from mf-prior-bench 1.10.0 (`mfpbench/synthetic/hartmann/generators.py` and
`benchmark.py`, Copyright the mf-prior-bench authors, Apache License 2.0; the definitions follow
Kandasamy et al., "Multi-fidelity Bayesian optimisation with continuous approximations", 2017).
Ported rather than installed: mf-prior-bench pins numpy 1.26 and pulls ConfigSpace and pandas,
which would downgrade posetune's environment. tests/test_external_benchmarks.py checks this port
against values computed with mfpbench itself (in a separate virtual environment), value for value.

A fidelity z runs from 1 to 100. Lower fidelities flatten the function (alpha shrinks by
`bias * (1 - s)`, s = log z / log 100) and add non-negative noise (|N(0, 1)| x noise x (1 - s)),
seeded by the benchmark's seed, z and the point, so a point at a fidelity always gives the same
value. At z = 100 the value is the plain Hartmann function.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

Z_MIN, Z_MAX = 1, 100  # mfpbench's fidelity range for the Hartmann benchmarks
DEFAULT_SEED = 1337  # mfpbench's seed when none (or 0) is given

ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
A3 = np.array([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]])
P3 = np.array([[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547], [381, 5743, 8828]], dtype=float)
A6 = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
P6 = np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ],
    dtype=float,
)
OPTIMA = {  # the known minimisers (mfpbench's `optimum`)
    3: (0.114614, 0.555649, 0.852547),
    6: (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573),
}
# mfpbench's presets: (fidelity bias, fidelity noise). "" is the plain mfh3 / mfh6 (DEHB's benchmark).
PRESETS = {"": (0.5, 0.1), "good": (2.5, 2.0), "moderate": (3.0, 3.0), "bad": (3.5, 4.0), "terrible": (4.0, 5.0)}


@dataclass(frozen=True)
class MFHartmann:
    """mfh3 or mfh6 with a preset's bias and noise; `seed` as mfpbench's benchmark seed."""

    dims: int
    bias: float
    noise: float
    seed: int | None = None

    def __call__(self, z: int, xs: tuple[float, ...]) -> float:
        """The value at fidelity z of the point xs (X_0, X_1, ...), as mfpbench's generator."""
        assert len(xs) == self.dims and Z_MIN <= z <= Z_MAX
        a, p = (A3, P3) if self.dims == 3 else (A6, P6)
        scaled = (math.log(z) - math.log(Z_MIN)) / (math.log(Z_MAX) - math.log(Z_MIN))
        alpha = ALPHA - self.bias * (1 - scaled)
        x = np.array(xs, dtype=float).reshape(1, -1)
        inner = np.sum(a * (x[:, np.newaxis, :] - 0.0001 * p) ** 2, axis=-1)
        value = -np.sum(alpha * np.exp(-inner), axis=-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as mfpbench: the product may be a very large integer
            rng = np.random.default_rng(seed=abs((self.seed or DEFAULT_SEED) * z * hash(tuple(xs))))
        noise = np.abs(rng.normal(size=value.size)) * self.noise * (1 - scaled)
        return float((value + noise)[0])

    def true_value(self, xs: tuple[float, ...]) -> float:
        """The noiseless full-fidelity value: the plain Hartmann function."""
        return self(Z_MAX, xs)

    @property
    def optimum(self) -> float:
        """The global minimum (-3.86278 for mfh3, -3.32237 for mfh6)."""
        return self.true_value(OPTIMA[self.dims])
