# Two set-up-and-go commands: `make demo` (the main job end to end) and `make test`.
# Both create .venv and install the pinned set on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo demo-sliced test lint bench bench-db train-demo-model train-small-defect-model clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Test-only packages (SAHI, the sliced-inference reference), without their dependencies: see
# requirements-test.txt.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-test.txt
	touch $(TEST_STAMP)

demo: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/demo.py

# Small defects, sliced inference, through the same DAG (6 images, a few minutes on 2 cores).
demo-sliced: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/demo.py --sliced

test: $(TEST_STAMP)
	YOLO_OFFLINE=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(TEST_STAMP)
	YOLO_OFFLINE=1 $(PY) bench/pipeline_bench.py $(BENCH_ARGS)

bench-db: $(STAMP)
	$(PY) bench/db_bench.py $(BENCH_ARGS)

train-demo-model: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/train_demo_model.py

train-small-defect-model: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/train_demo_model.py --defects small

clean:
	rm -rf demo demo-sliced .airflow runs bench/results
