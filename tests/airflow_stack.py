"""A real Airflow 3 deployment for the end-to-end tests, started and stopped as subprocesses.

``AirflowStack`` runs ``airflow db migrate`` against a fresh PostgreSQL database, creates the
``gpu`` pool (unless told not to, as on a fresh install), then starts on loopback, each in its
own process group:

* ``airflow api-server`` (REST API, UI, execution API for the workers),
* ``airflow scheduler`` (CeleryExecutor, broker = the local Redis under a private key prefix),
* ``airflow dag-processor``,
* ``airflow triggerer`` (runs deferred tasks' triggers: the drop-ready gate waits there),
* ``airflow celery worker -q gpu -c 1`` and ``airflow celery worker -q default -c 1`` (or the
  workers a test asks for: :class:`Worker`, each with its own queue and environment, e.g. two
  ``gpu`` workers that share no folder, as two GPU hosts would).

Every process and every process they start carries the marker variable ``IMAGE_ETL_E2E_STACK``
(a fresh id per stack); ``stop()`` terminates the process groups, then kills by pid anything
left with that marker, and ``strays()`` lists what is still alive (it must be nothing). Logs
go to ``<artifacts>/<component>.log``, task logs to ``<artifacts>/task-logs``.

Authentication is the simple auth manager with a real user (``admin``, random password in a
passwords file): clients get a JWT from ``POST /auth/token``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MARKER = "IMAGE_ETL_E2E_STACK"
DEFAULT_QUEUE = "default"
GPU_QUEUE = "gpu"
USERNAME = "admin"


class StackError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Worker:
    """One Celery worker: its component name (log ``worker-<name>.log``), its queue, and what
    its environment adds to (or overrides in) the stack's."""

    name: str
    queue: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)


DEFAULT_WORKERS = (Worker(GPU_QUEUE, GPU_QUEUE), Worker(DEFAULT_QUEUE, DEFAULT_QUEUE))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """If pytest itself is killed, the direct child gets SIGTERM (Linux prctl PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A CI timeout sends SIGTERM: raise it as KeyboardInterrupt inside, so that every ``with``
    around a stack stops its processes on the way out. The previous handler is back after."""
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 1.0,
             on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; raise StackError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError) as e:
            value, last_error = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            try:
                extra = on_timeout() if on_timeout else ""
            except Exception as e:  # diagnostics must not hide the timeout
                extra = f"(no diagnostics: {e!r})"
            raise StackError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                             + (f" (last error: {last_error!r})" if last_error else "")
                             + (f"\n{extra}" if extra else ""))
        time.sleep(poll_s)


class AirflowStack:
    """Start/stop a CeleryExecutor Airflow on loopback. Use as a context manager."""

    def __init__(self, *, home: Path, artifacts: Path, metadata_url: str,
                 extra_env: dict[str, str] | None = None, redis_url: str = "redis://127.0.0.1:6379/0",
                 gpu_pool_slots: int | None = 2, workers: Sequence[Worker] = DEFAULT_WORKERS):
        self.home = home
        self.workers = tuple(workers)
        self.gpu_pool_slots = gpu_pool_slots  # None: no pool made, as on a fresh install
        self.artifacts = artifacts
        self.metadata_url = metadata_url
        self.redis_url = redis_url
        self.stack_id = uuid.uuid4().hex[:12]
        self.redis_prefix = f"image_etl_e2e_{self.stack_id}:"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(16)
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()  # components a test killed on purpose
        self._logs: list[Any] = []
        self._stopped = False
        self.env = self._environment(extra_env or {})

    # --- configuration --------------------------------------------------------------------

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        from cryptography.fernet import Fernet

        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("AIRFLOW", "IMAGE_ETL_", "_AIRFLOW"))}
        self.home.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({USERNAME: self.password}) + "\n")
        env = {
            **inherited,
            MARKER: self.stack_id,
            "PATH": f"{VENV_BIN}{os.pathsep}{inherited.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "YOLO_OFFLINE": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.metadata_url}",
            # A private key prefix: other users of the shared Redis never see these queues.
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.artifacts / "task-logs"),
            # Only what the test asks for runs: no run for the latest cron tick when unpaused.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        }
        env.update(extra)
        return env

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> AirflowStack:
        atexit.register(self.stop)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def airflow(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Run an ``airflow`` CLI command in the stack's environment; raise with its output."""
        name = "cli-" + "-".join(a for a in args[:2] if not a.startswith("-"))
        log = self.artifacts / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([str(VENV_BIN / "airflow"), *args], env=self.env, cwd=self.home,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                raise StackError(f"airflow {' '.join(args)} took more than {timeout_s:.0f}s; "
                                 f"see {log}") from None
        if rc != 0:
            raise StackError(f"airflow {' '.join(args)} exited {rc}:\n{_tail(log)}")
        return subprocess.CompletedProcess(args, rc)

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        out = (self.artifacts / f"{name}.log").open("ab")
        self._logs.append(out)
        self.procs[name] = subprocess.Popen([str(VENV_BIN / "airflow"), *args],
                                            env={**self.env, **(env or {})},
                                            cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def start(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        self.airflow("db", "migrate", timeout_s=300)
        if self.gpu_pool_slots is not None:
            self.airflow("pools", "set", "gpu", str(self.gpu_pool_slots),
                         "one slot per GPU (two CPU devices here)", timeout_s=120)
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port),
                    "--workers", "1")
        self._spawn("scheduler", "scheduler")
        self._spawn("dag-processor", "dag-processor")
        self._spawn("triggerer", "triggerer", "--skip-serve-logs")
        for worker in self.workers:
            self._spawn(f"worker-{worker.name}", "celery", "worker", "--queues", worker.queue,
                        "--concurrency", "1", "--celery-hostname",
                        f"{worker.name}-{self.stack_id}@%h", "--skip-serve-logs",
                        "--without-mingle", "--without-gossip", env=worker.env)

        def left() -> float:
            return max(5.0, deadline - time.monotonic())

        wait_for("the API server", self._api_up, left(), on_timeout=self.diagnostics)
        wait_for("scheduler, DAG processor and triggerer heartbeats", self._healthy, left(),
                 on_timeout=self.diagnostics)
        for worker in self.workers:
            wait_for(f"the celery worker {worker.name!r} (queue {worker.queue!r})",
                     lambda n=worker.name: " ready." in self.log_text(f"worker-{n}"), left(),
                     on_timeout=self.diagnostics)

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL component ``name`` and every process it started, as a host that dies would
        (the task runner sits in a process group of its own: killing the group is not enough).
        Returns the pids killed; the component is then dead and stays so."""
        import psutil

        root = psutil.Process(self.procs[name].pid)
        victims = [root, *root.children(recursive=True)]
        for proc in victims:  # stop them all first, so none reacts to another's death
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(victims, timeout=30)
        self.procs[name].wait(timeout=30)
        self.killed.add(name)
        return [p.pid for p in victims]

    def _check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items()
                if p.poll() is not None and n not in self.killed}
        if dead:
            raise StackError(f"component(s) exited early: {dead}\n{self.diagnostics()}")

    def _api_up(self) -> bool:
        self._check_alive()
        return httpx.get(f"{self.base_url}/api/v2/version", timeout=5).status_code == 200

    def _healthy(self) -> bool:
        self._check_alive()
        health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
        return all(health.get(part, {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "dag_processor", "triggerer"))

    def stop(self, grace_s: float = 20) -> None:
        """Terminate every process group, then kill anything left that carries the marker."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for pid in self.strays():  # anything that left its group (setsid) but kept the marker
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for out in self._logs:
            out.close()
        self._forget_redis_keys()
        wait_for("every stack process to exit", lambda: not self.strays(), 15, poll_s=0.2)

    def _forget_redis_keys(self) -> None:
        """Remove this stack's broker keys (queues, bindings) from the shared Redis."""
        import redis

        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=500))
            if keys:
                client.delete(*keys)
            client.close()

    def strays(self) -> list[int]:
        """Live processes (not zombies) started by this stack, found by the marker variable."""
        needle = f"{MARKER}={self.stack_id}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                found.append(int(entry.name))
        return found

    # --- observing ------------------------------------------------------------------------

    def log_text(self, name: str) -> str:
        path = self.artifacts / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            parts.append(f"--- {name} (exit {proc.poll()}) ---\n{_tail(self.artifacts / f'{name}.log')}")
        return "\n".join(parts)

    # --- REST API -------------------------------------------------------------------------

    def token(self) -> str:
        r = httpx.post(f"{self.base_url}/auth/token", json={"username": USERNAME, "password": self.password},
                       timeout=30)
        if r.status_code != 201:
            raise StackError(f"POST /auth/token: {r.status_code} {r.text}")
        return r.json()["access_token"]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.base_url}/api/v2", timeout=60,
                            headers={"Authorization": f"Bearer {self.token()}"})


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Chromium:
    """Headless Debian ``chromium`` driven over the DevTools protocol (no downloaded browser)."""

    def __init__(self, profile: Path, log: Path, width: int = 1600, height: int = 1000,
                 binary: str = "chromium"):
        self.profile, self.log, self.binary = profile, log, binary
        self.size = (width, height)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._id = 0

    def __enter__(self) -> Chromium:
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                 f"--window-size={self.size[0]},{self.size[1]}", f"--user-data-dir={self.profile}",
                 f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
                 "about:blank"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            out.close()
        try:
            devtools = f"http://127.0.0.1:{self.port}"
            wait_for("chromium's DevTools endpoint",
                     lambda: httpx.get(f"{devtools}/json/version", timeout=5).status_code == 200, 60,
                     poll_s=0.5)
            pages = [t for t in httpx.get(f"{devtools}/json/list", timeout=10).json() if t["type"] == "page"]
            if not pages:
                pages = [httpx.put(f"{devtools}/json/new?about:blank", timeout=10).json()]
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            self.call("Page.enable")
            self.call("Network.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
        if self.proc is not None:
            _kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            _kill_group(self.proc.pid, signal.SIGKILL)  # helpers (zygote, renderers) left behind

    def call(self, method: str, timeout_s: float = 60, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self._id:
                if "error" in message:
                    raise StackError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise StackError(f"javascript error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout_s: float) -> str:
        def check() -> str | None:
            text = self.text()
            return text if all(n in text for n in needles) else None

        return wait_for(f"page text {needles}", check, timeout_s, poll_s=0.5,
                        on_timeout=lambda: "page text was:\n" + self.text()[:3000])

    def wait_until_still(self, timeout_s: float = 15.0) -> None:
        """Until no finite CSS animation or transition runs (endless ones, like a spinner, never
        end): while an accordion opens, what a click aims at moves, and a screenshot catches
        two sections half drawn."""
        wait_for("the page to stop animating", lambda: self.evaluate(
            "document.getAnimations().every(a => a.playState !== 'running'"
            " || a.effect?.getComputedTiming().endTime === Infinity)"), timeout_s, poll_s=0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def click(self, element_js: str) -> None:
        """A real mouse click (press + release) in the middle of the element ``element_js``."""
        where = self.evaluate(
            f"(() => {{ const e = {element_js}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not where:
            raise StackError(f"nothing to click: {element_js}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=where[0], y=where[1], button="left",
                      clickCount=1)

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
