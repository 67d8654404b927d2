"""docker-compose.yaml, Dockerfile and .env.example: valid, and consistent with the DAG.

``docker-compose config`` (Debian's docker-compose package; it needs no Docker engine) resolves
the file with ``.env.example``; the tests then check the invariants that matter on a GPU host:
each GPU worker reserves exactly one device and runs one task at a time on the queue the DAG's
``infer`` uses, the CPU worker takes the DAG's other queue, every Airflow container mounts the
code and the shared data folders, and the image is built from the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT

COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-init"}


def _compose_config() -> tuple[dict[str, Any], str]:
    binary = shutil.which("docker-compose")
    if not binary:
        message = "docker-compose is not installed (Debian: apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(message)
    # A clean environment: shell variables would override .env.example's values.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()}
    done = subprocess.run([binary, "--project-directory", str(ROOT), "-f", str(COMPOSE),
                           "--env-file", str(ENV_EXAMPLE), "config"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout), done.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    config, _ = _compose_config()
    return config


@pytest.fixture(scope="module")
def dag_queues(compose) -> dict[str, list[str]]:
    """Each task's (queue, pool), parsed from the DAG file with the deployment's settings."""
    deployment = _env(compose["services"]["airflow-scheduler"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IMAGE_ETL_"))}
    env.update({k: v for k, v in deployment.items()
                if k.startswith(("IMAGE_ETL_", "AIRFLOW__OPERATORS__"))})
    home = tempfile.mkdtemp(prefix="image_etl_compose_airflow_")
    env.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    code = ("import json, sys; from airflow.dag_processing.dagbag import DagBag; "
            "bag = DagBag(dag_folder=sys.argv[1]); assert not bag.import_errors, bag.import_errors; "
            "dag = bag.dags['nightly_detections']; "
            "print(json.dumps({t.task_id: [t.queue, t.pool] for t in dag.tasks}))")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True,
                              text=True, timeout=300, env=env, cwd=home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _uncommented(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _workers(compose) -> dict[str, dict[str, Any]]:
    """Celery workers: name → queues, concurrency, reserved devices."""
    workers = {}
    for name, service in compose["services"].items():
        args = _command(service)
        if args[:2] != ["celery", "worker"]:
            continue
        queues = _option(args, "--queues", "-q")
        concurrency = _option(args, "--concurrency", "-c")
        devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
            "devices") or []
        workers[name] = {"queues": queues.split(",") if queues else None,
                         "concurrency": int(concurrency) if concurrency else None,
                         "devices": devices, "env": _env(service)}
    return workers


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path → (host path, read-only)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            mounts[target] = (source, "ro" in mode.split(","))
        else:
            mounts[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only")))
    return mounts


def test_config_resolves_with_env_example_alone():
    _, stderr = _compose_config()
    # Every ${VAR} without a default is defined in .env.example ...
    assert "variable is not set" not in stderr, stderr
    # ... and .env.example defines nothing the compose file does not use.
    text = COMPOSE.read_text()
    keys = [line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert keys and all(re.search(r"\$\{" + re.escape(k) + r"[:}-]", text) for k in keys), keys


def test_official_layout_and_one_image_built_from_the_dockerfile(compose):
    services = compose["services"]
    workers = _workers(compose)
    assert {"postgres", "results-db", "redis", *AIRFLOW_SERVICES} <= set(services)
    airflow = AIRFLOW_SERVICES | set(workers)
    images = {services[name].get("image") for name in airflow}
    assert len(images) == 1 and None not in images, images
    for name in airflow:
        build = services[name].get("build") or {}
        assert Path(build.get("context", "")).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        env = _env(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:") or \
            env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:@redis:"), name
        assert "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        # The results DB is the other PostgreSQL, through the image_etl_db connection.
        assert re.match(r"postgresql://[^@]+@results-db:5432/\w+$", env["AIRFLOW_CONN_IMAGE_ETL_DB"]), name
        assert not any(k.startswith("_PIP_ADDITIONAL_REQUIREMENTS") for k in env), name
        # Workers reach the execution API of the api-server service.
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in _uncommented(COMPOSE)
    api_ports = [str(p.get("target") if isinstance(p, dict) else p).split(":")[-1]
                 for p in services["airflow-apiserver"].get("ports", [])]
    assert "8080" in api_ports
    init = services["airflow-init"]
    assert _env(init).get("_AIRFLOW_DB_MIGRATE") == "true"
    script = " ".join(_command(init))
    assert re.search(r"airflow pools set gpu \"\$+\{?IMAGE_ETL_GPUS\b", script), "init must size the gpu pool"


def test_every_airflow_container_mounts_code_and_shared_data(compose):
    services = compose["services"]
    for name in AIRFLOW_SERVICES | set(_workers(compose)):
        mounts = _mounts(services[name])
        env = _env(services[name])
        for folder in ("dags", "plugins", "include"):
            target = f"/opt/airflow/{folder}"
            assert target in mounts and Path(mounts[target][0]).resolve() == ROOT / folder, (name, folder)
        # The DAG file finds the engine at <dags>/../include.
        assert str(Path("/opt/airflow/dags").parent / "include") in mounts
        drop_root = env["IMAGE_ETL_DROP_DIR"].split("{")[0].rstrip("/")
        output_root = env["IMAGE_ETL_OUTPUT_DIR"].split("{")[0].rstrip("/")
        assert drop_root in mounts and mounts[drop_root][1] is True, (name, drop_root)
        assert output_root in mounts and mounts[output_root][1] is False, (name, output_root)
        assert env["YOLO_OFFLINE"] == "1"
        model = env["IMAGE_ETL_MODEL"]
        assert any(model.startswith(target + "/") for target in mounts), (name, model)


def test_one_worker_per_gpu_and_queues_match_the_dag(compose, dag_queues):
    workers = _workers(compose)
    gpu_queue, gpu_pool = dag_queues["infer"]
    other_queues = {queue for task, (queue, _) in dag_queues.items() if task != "infer"}
    assert gpu_queue not in other_queues

    gpu_workers = {n: w for n, w in workers.items() if w["devices"]}
    cpu_workers = {n: w for n, w in workers.items() if not w["devices"]}
    assert len(gpu_workers) >= 1 and len(cpu_workers) >= 1, workers
    device_ids = []
    for name, worker in gpu_workers.items():
        assert len(worker["devices"]) == 1, name
        device = worker["devices"][0]
        # Exactly one GPU: by id, never by count ("all" or N would give several).
        assert "count" not in device and len(device.get("device_ids") or []) == 1, (name, device)
        assert "gpu" in device.get("capabilities", []) and device.get("driver") == "nvidia", name
        device_ids.append(str(device["device_ids"][0]))
        assert worker["queues"] == [gpu_queue] and worker["concurrency"] == 1, (name, worker)
        # Nothing may widen or renumber what the reservation exposes.
        assert not {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"} & set(worker["env"]), name
    assert len(set(device_ids)) == len(device_ids), device_ids
    for name, worker in cpu_workers.items():
        assert worker["queues"] and gpu_queue not in worker["queues"], (name, worker)
    # Every queue of the DAG has a worker; no worker waits on a queue the DAG never uses.
    consumed = {q for w in workers.values() for q in w["queues"]}
    assert consumed == other_queues | {gpu_queue}, (consumed, dag_queues)

    # The pool and the DAG's shard count follow the fleet: one slot and one shard per GPU worker.
    common = _env(compose["services"]["airflow-scheduler"])
    assert gpu_pool == "gpu"
    assert int(common["IMAGE_ETL_GPUS"]) == len(gpu_workers)
    assert common["IMAGE_ETL_DEVICES"] == "auto"
    assert common["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] in other_queues


def test_dockerfile_extends_the_official_image_and_installs_requirements():
    text = _uncommented(DOCKERFILE)
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    pinned = re.search(r"^apache-airflow==(\S+)$", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert pinned, "requirements.txt must pin apache-airflow"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the Python the tests run on
    assert froms == [f"apache/airflow:{pinned.group(1)}-python{python}"]
    run = " ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)$", text, flags=re.M)).replace("\\\n", " ")
    assert re.search(r"pip install .*-r \S*requirements\.txt", run), run
    assert re.search(r"\"apache-airflow==\$\{AIRFLOW_VERSION\}\"", run), "keep Airflow pinned"
    sources = set()
    for line in re.findall(r"^COPY\s+(.*)$", text, flags=re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        sources.update(args[:-1])
    assert {"requirements.txt", "dags/", "include/", "pyproject.toml"} <= sources, sources
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in text
    # One way to find the engine: the installed package, not a PYTHONPATH or a sys.path edit.
    assert re.search(r"pip install .*--no-deps -e /opt/airflow\b", run), run
    assert "PYTHONPATH" not in text
    assert "sys.path" not in (ROOT / "dags" / "nightly_detections.py").read_text()
