# Each target sets up what it needs (idempotent): a .venv with posetune and its dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo train-demo test test-fast test-autoscaler lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# The main job on embedded defaults: a hyperparameter search on a synthetic dataset it
# generates on first use (about 10 minutes on a 2-core CPU).
demo: $(STAMP)
	$(BIN)/posetune search search_spaces/quick.yaml --name quick-$$(date +%Y%m%d-%H%M%S)

# One training run of configs/quick.yaml with its metrics (about 5 minutes on a 2-core CPU).
train-demo: $(STAMP)
	@test -d data/quick/train || $(BIN)/posetune data synth data/quick --train 2000 --val 300 --seed 0
	$(BIN)/posetune train --config configs/quick.yaml dataset.root=data/quick system.out_dir=runs/quick-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/posetune evaluate --checkpoint $$(ls -td runs/quick-*/ | head -1)checkpoints/best.pt

# Everything, Ray, servers, slow and autoscaler tests included (what CI runs), as two pytest
# runs side by side: the tests that start Ray (marker `ray`) one after another, since two Ray
# instances on one machine break each other, and the others beside them at the lowest priority (nice 19),
# on the cores Ray's tests mostly leave idle while they wait; their output follows. The 25 slowest Ray tests are
# listed. (pytest-xdist's loadgroup would do this in one run, but its groups do not work with
# pytest 9.2: it sets Item._nodeid, which pytest no longer reads.)
test: $(STAMP)
	@others=$$(mktemp); \
	nice -n 19 $(BIN)/python -m pytest -q --durations=10 -m "not ray" > $$others 2>&1 & pid=$$!; \
	$(BIN)/python -m pytest -q --durations=25 -m ray; ray_rc=$$?; \
	wait $$pid; others_rc=$$?; \
	echo "--- the tests that start no Ray (run beside the Ray tests; exit code $$others_rc) ---"; \
	cat $$others; rm -f $$others; \
	test $$ray_rc -eq 0 && test $$others_rc -eq 0

# The search on Ray's own autoscaler with simulated nodes alone (tests/test_autoscaler.py, ~7 min).
test-autoscaler: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 tests/test_autoscaler.py

# What a newcomer runs first (about a minute): no test that starts Ray or a server, or is slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not server and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/orchestration.py
	$(BIN)/python benchmarks/step.py
	$(BIN)/python benchmarks/gpu.py  # measures only where a CUDA GPU is; says so and skips elsewhere
	$(BIN)/python benchmarks/search_efficiency.py replay  # over the committed recording (record: ~1 h)
	$(BIN)/python benchmarks/external.py  # public HPO benchmarks (the bench extra), ~10 min on 2 cores

clean:
	rm -rf runs data/quick
