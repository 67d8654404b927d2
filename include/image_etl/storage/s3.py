"""The object-storage backend: an S3 bucket prefix through fsspec's s3fs.

Options (key, secret, session token, endpoint URL, region) are given by the caller: the DAG
layer derives them from an Airflow ``aws`` connection; the engine never reads connections.
No options at all means boto's own credential chain (an instance role, the environment).

- Listing is by prefix (ListObjectsV2, paginated past 1,000 keys by s3fs), never a glob (a glob
  lists the whole bucket, fsspec/filesystem_spec#1995), and s3fs's listing cache is off: the
  late-file catch-up must see objects that arrived since the last look.
- A write is one PUT (multipart above s3fs's block size, which also appears at once on
  completion): readers see the old object or the new one, never a part.
- Every call is bounded: connect and read timeouts, a few retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from image_etl.storage.base import Entry, Storage, Walk, has_extension, hidden_part
from image_etl.storage.errors import (
    BucketNotFoundError,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageNotFoundError,
)
from image_etl.storage.location import ObjectLocation, check_rel_path

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3
# Connections one storage may open at once (botocore's default is 10): the worker's read-ahead
# on a many-core host runs more GETs than that (image_etl.worker.read_concurrency).
MAX_CONNECTIONS = 64


@dataclasses.dataclass(frozen=True)
class S3Options:
    """How to reach the bucket. ``repr`` hides the secrets (it may end up in a log)."""

    key: str | None = dataclasses.field(default=None, repr=False)
    secret: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    endpoint_url: str | None = None
    region_name: str | None = None
    # TLS: None, botocore's default (the system's CAs); a path, the CA bundle that signed a
    # private endpoint's certificate; False, no verification (the connection's owner asked).
    verify: bool | str | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> S3Options:
        """From a plain dict (``key``, ``secret``, ``token``, ``endpoint_url``, ``region_name``,
        ``verify``)."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:  # name the option, never its value
            raise StorageConfigError(f"unknown storage option {unknown[0]!r} (known: "
                                     f"{', '.join(sorted(known))})")
        verify = _verify(options.pop("verify", None))
        values = {k: (str(v) if v not in (None, "") else None) for k, v in options.items()}
        if bool(values.get("key")) != bool(values.get("secret")):
            raise StorageConfigError("storage options: a key needs its secret and a secret its key")
        return cls(**values, verify=verify)

    def s3fs_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "use_listings_cache": False,
            # One GET per object: with s3fs's default (10) every cat_file first HEADs the object
            # to decide on ranged parts (only above its 50 MB block size), a second request per
            # image for the client and the server. The worker reads many objects at once instead.
            "max_concurrency": 1,
            "skip_instance_cache": True,
            "config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                              # No CRC32 of every downloaded image (botocore's default asks the
                              # server for one, both sides compute it): ~2 ms of client and ~1 ms
                              # of server CPU per 4 MB image (bench/README.md). TCP, TLS on https
                              # endpoints and botocore's length check still guard the bytes, and
                              # the decoder rejects a broken JPEG. Uploads keep their checksums.
                              "response_checksum_validation": "when_required",
                              "max_pool_connections": MAX_CONNECTIONS,
                              "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"}},
        }
        if self.key:
            kwargs.update(key=self.key, secret=self.secret)
        if self.token:
            kwargs["token"] = self.token
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        client: dict[str, Any] = {}
        if self.region_name:
            client["region_name"] = self.region_name
        if self.verify is not None:
            client["verify"] = self.verify
        if client:
            kwargs["client_kwargs"] = client
        return kwargs


def _verify(value: Any) -> bool | str | None:
    """The ``verify`` option as botocore takes it: True/False (also "true"/"false", as an
    Airflow connection's extra may hold them), a CA bundle's path, or None (the default)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip()
    if not text:
        return None
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    if not Path(text).is_file():
        raise StorageConfigError(f"storage option verify: no CA bundle file at {text}")
    return text


class S3Storage(Storage):
    def __init__(self, location: ObjectLocation, options: S3Options | Mapping[str, Any] | None = None,
                 *, _fs: Any = None) -> None:
        self.location = location
        self.options = options if isinstance(options, S3Options) else S3Options.from_mapping(options)
        if _fs is None:
            import s3fs  # only when a URL asks for object storage

            _fs = s3fs.S3FileSystem(**self.options.s3fs_kwargs())
        self._fs = _fs

    @property
    def url(self) -> str:
        return self.location.url

    def child(self, rel_path: str) -> S3Storage:
        return S3Storage(self.location.child(rel_path), self.options, _fs=self._fs)

    def _path(self, rel_path: str = "") -> str:
        """``bucket/key`` as s3fs names it."""
        key = self.location.key(check_rel_path(rel_path, allow_empty=True))
        return f"{self.location.bucket}/{key}" if key else self.location.bucket

    def walk(self, extensions: Collection[str]) -> Walk:
        root = self._path()
        files: list[Entry] = []
        other: list[str] = []
        hidden: set[str] = set()
        with self._errors(""):
            # A trailing "/": a prefix "night" must not also list "night-2/".
            found = self._fs.find(root + "/" if self.location.prefix else root, detail=True,
                                  withdirs=False)
        start = len(self._path()) + 1
        for name, info in found.items():
            rel = name[start:]
            if not rel or name.endswith("/") or info.get("type") != "file":
                continue  # directory markers
            hidden_at = hidden_part(rel)
            if hidden_at is not None:  # the uploaders' temp objects
                hidden.add(hidden_at)
                continue
            if not has_extension(rel, extensions):
                other.append(rel)
                continue
            modified = info.get("LastModified")
            files.append(Entry(rel, int(info.get("size") or 0),
                               modified.timestamp() if modified is not None else 0.0))
        files.sort(key=lambda e: e.rel_path)
        return Walk(files, [], sorted(other), len(hidden))

    def read_bytes(self, rel_path: str) -> bytes:
        with self._errors(rel_path):
            return bytes(self._fs.cat_file(self._path(rel_path)))

    def write_atomic(self, rel_path: str, data: bytes | str) -> None:
        with self._errors(rel_path):
            self._fs.pipe_file(self._path(rel_path), data.encode() if isinstance(data, str) else data)

    def exists(self, rel_path: str) -> bool:
        try:
            with self._errors(rel_path):
                self._fs.info(self._path(rel_path))
        except BucketNotFoundError:
            raise
        except StorageNotFoundError:
            return False
        return True

    def remove_file(self, rel_path: str) -> None:
        try:
            with self._errors(rel_path):
                self._fs.rm_file(self._path(check_rel_path(rel_path)))
        except BucketNotFoundError:
            raise
        except StorageNotFoundError:
            pass

    def remove_tree(self, rel_path: str = "") -> None:
        target = self._path(rel_path)
        under = target + "/" if (self.location.prefix or rel_path) else target
        with self._errors(rel_path):
            keys = self._fs.find(under, withdirs=False)  # every object, markers included
            if keys:
                self._fs.rm(sorted(keys))

    @contextlib.contextmanager
    def _errors(self, rel_path: str) -> Iterator[None]:
        """s3fs / botocore errors as one-line StorageErrors naming the bucket and key."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, the original is not chained
            raise translate(exc, self.location, rel_path, self.options.endpoint_url) from None


_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                 "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AccountProblem"}


def _error_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code") or "") or None
    return None


def translate(exc: BaseException, location: ObjectLocation, rel_path: str,
              endpoint_url: str | None = None) -> StorageError:
    """The one-line error for ``exc`` (from s3fs or botocore) on ``rel_path`` under ``location``.

    Built from the location and the error's code and class only: botocore's messages can carry
    request details, a credential never belongs in a task log.
    """
    where = f"{location.scheme}://{location.bucket}/{location.key(rel_path)}".rstrip("/")
    code = _error_code(exc)
    name = type(exc).__name__
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError)
                                  and "bucket does not exist" in str(exc)):
        return BucketNotFoundError(f"{where}: bucket {location.bucket!r} does not exist")
    if isinstance(exc, FileNotFoundError) or code in {"NoSuchKey", "404"}:
        return StorageNotFoundError(f"{where}: no such object")
    if isinstance(exc, PermissionError) or code in _ACCESS_CODES:
        return StorageAccessError(f"{where}: access denied ({code or 'Forbidden'}): check the "
                                  f"storage connection's key and secret and its permissions on "
                                  f"bucket {location.bucket!r}")
    if name in {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageConfigError(f"{where}: no credentials: give the storage connection a key "
                                  "and secret, or run with an instance role")
    if name in {"SSLError", "ClientConnectorCertificateError", "ClientSSLError",
                "SSLCertVerificationError"}:
        # An untrusted certificate stays untrusted on a retry (a configuration error); another
        # TLS failure (a handshake cut short) may pass the next time.
        untrusted = "CERTIFICATE_VERIFY_FAILED" in str(exc).upper().replace(" ", "_")
        return (StorageConfigError if untrusted else StorageError)(
            f"{where}: TLS with {endpoint_url or 'the AWS endpoint'} failed ({name}"
            f"{': certificate not trusted' if untrusted else ''}): if the endpoint's certificate "
            "is signed by a private CA, give the storage connection's extra \"verify\" that CA "
            "bundle's path")
    if name in {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError"}:
        return StorageError(f"{where}: cannot reach the storage endpoint "
                            f"{endpoint_url or '(AWS default)'} ({name})")
    if name in {"InvalidEndpointError", "ValueError"} or isinstance(exc, ValueError):
        return StorageConfigError(f"{where}: bad storage configuration ({name})")
    return StorageError(f"{where}: {name}{f' ({code})' if code else ''}")
