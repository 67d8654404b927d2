# Two set-up-and-go commands: `make demo` (the main job end to end) and `make test`.
# Both create .venv and install the pinned set on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-db train-demo-model clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/demo.py

test: $(STAMP)
	YOLO_OFFLINE=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	YOLO_OFFLINE=1 $(PY) bench/pipeline_bench.py $(BENCH_ARGS)

bench-db: $(STAMP)
	$(PY) bench/db_bench.py $(BENCH_ARGS)

train-demo-model: $(STAMP)
	YOLO_OFFLINE=1 $(PY) scripts/train_demo_model.py

clean:
	rm -rf demo .airflow runs bench/results
