"""The storage seam against a real S3 server (SeaweedFS, tests/s3.py) and a local folder.

No mocks: every S3 call goes over HTTP to ``weed mini`` with S3 authentication on.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from image_etl.discover import IMAGE_EXTENSIONS, list_images
from image_etl.storage import (
    BucketNotFoundError,
    LocalStorage,
    StorageAccessError,
    StorageConfigError,
    StorageError,
    StorageNotFoundError,
    open_storage,
    parse_object_url,
    read_ahead,
)


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.new_bucket()


def _put(s3_server, bucket: str, keys: dict[str, bytes]) -> None:
    client = s3_server.client()
    for key, body in keys.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


# --- URLs -----------------------------------------------------------------------------------

def test_urls_name_a_connection_never_credentials():
    loc = parse_object_url("s3://minio_prod@night-drops/2026/11/20/")
    assert (loc.conn_id, loc.bucket, loc.prefix) == ("minio_prod", "night-drops", "2026/11/20")
    assert loc.url == "s3://night-drops/2026/11/20"  # the connection id stays out of records
    assert parse_object_url("s3://night-drops").prefix == ""
    with pytest.raises(StorageConfigError, match="connection id") as err:
        parse_object_url("s3://AKIAKEY:s3cr3t@night-drops/x")
    assert "s3cr3t" not in str(err.value)
    for bad in ("s3://Bad_Bucket/x", "s3://night-drops/a/../b", "gs://night-drops/x"):
        with pytest.raises(StorageConfigError):
            parse_object_url(bad)


def test_prefix_containment_is_at_a_slash():
    root = parse_object_url("s3://drops/night")
    assert parse_object_url("s3://drops/night/2026").is_relative_to(root)
    assert parse_object_url("s3://drops/night").is_relative_to(root)
    assert not parse_object_url("s3://drops/night-2/x").is_relative_to(root)
    assert not parse_object_url("s3://other/night/x").is_relative_to(root)
    assert parse_object_url("s3://drops/anything").is_relative_to(parse_object_url("s3://drops"))


# --- listing ----------------------------------------------------------------------------------

def test_s3_listing_rules(s3_server, bucket):
    _put(s3_server, bucket, {
        "night/a.jpg": b"1", "night/sub/deeper/B.JPEG": b"22", "night/c.png": b"333",
        "night/notes.txt": b"x", "night/.hidden.jpg": b"x", "night/.tmp/part.jpg": b"x",
        "night/.tmp/part2.jpg": b"x", "night/sub/.up/x.jpg": b"x", "night/cam 2/ü+%.jpg": b"4444",
        "night/sub/": b"", "night/empty-dir/": b"",  # directory markers (console "folders")
        "night-2/other.jpg": b"x", "elsewhere/d.jpg": b"x",
    })
    walk = open_storage(f"s3://{bucket}/night", s3_server.options()).walk(IMAGE_EXTENSIONS)
    assert [(e.rel_path, e.size) for e in walk.files] == [
        ("a.jpg", 1), ("c.png", 3), ("cam 2/ü+%.jpg", 4), ("sub/deeper/B.JPEG", 2)]
    assert walk.other == ["notes.txt"]
    assert walk.links == []
    assert walk.hidden == 3  # .hidden.jpg, .tmp (one folder), sub/.up
    # last-modified times are the server's, close to now
    assert all(abs(e.mtime - time.time()) < 120 for e in walk.files)
    assert open_storage(f"s3://{bucket}/night", s3_server.options()).read_bytes("cam 2/ü+%.jpg") \
        == b"4444"


def test_s3_listing_pages_past_1000_keys(s3_server, bucket):
    keys = {f"big/{i // 100:02d}/{i:05d}.jpg": b"" for i in range(1100)}
    with cf.ThreadPoolExecutor(16) as pool:
        client = s3_server.client()
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    walk = open_storage(f"s3://{bucket}/big", s3_server.options()).walk(IMAGE_EXTENSIONS)
    assert len(walk.files) == 1100
    assert [e.rel_path for e in walk.files] == sorted(k[len("big/"):] for k in keys)


def test_s3_settle_by_last_modified(s3_server, bucket):
    """An object's LastModified is its mtime, so a just-written one is left unsettled.

    LastModified has whole seconds (S3 truncates), so the bounds allow for that and the settle
    rule is checked at a chosen ``now``: a real clock made it flaky on a slow listing."""
    before_old = time.time()
    _put(s3_server, bucket, {"n/old.jpg": b"1"})
    time.sleep(2.2)
    before_new = time.time()
    _put(s3_server, bucket, {"n/new.jpg": b"2"})
    after_new = time.time()
    store = open_storage(f"s3://{bucket}/n", s3_server.options())
    files = {e.rel_path: e for e in store.walk(IMAGE_EXTENSIONS).files}
    assert int(before_old) <= files["old.jpg"].mtime <= before_new
    assert int(before_new) <= files["new.jpg"].mtime <= after_new
    listing = list_images(store, settle_s=1.0, now=files["new.jpg"].mtime + 0.5)
    assert [i.rel_path for i in listing.images] == ["old.jpg"]
    assert listing.unsettled == ["new.jpg"]


def test_s3_empty_drop_is_zero_objects(s3_server, bucket):
    store = open_storage(f"s3://{bucket}/nothing/here", s3_server.options())
    walk = store.walk(IMAGE_EXTENSIONS)
    assert (walk.files, walk.links, walk.other) == ([], [], [])
    assert open_storage(f"s3://{bucket}", s3_server.options()).walk(IMAGE_EXTENSIONS).files == []


def test_local_listing_rules(tmp_path):
    (tmp_path / "sub" / ".tmp").mkdir(parents=True)
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "sub" / "B.TIF").write_bytes(b"22")
    (tmp_path / "sub" / ".tmp" / "x.jpg").write_bytes(b"x")
    (tmp_path / ".h.jpg").write_bytes(b"x")
    (tmp_path / "sub" / ".tmp" / "y.jpg").write_bytes(b"y")
    (tmp_path / "readme.md").write_bytes(b"x")
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    walk = LocalStorage(tmp_path).walk(IMAGE_EXTENSIONS)
    assert [(e.rel_path, e.size) for e in walk.files] == [("a.jpg", 1), ("sub/B.TIF", 2)]
    assert walk.links == ["link.jpg"] and walk.other == ["readme.md"]
    assert walk.hidden == 2  # .h.jpg, sub/.tmp (one folder)
    with pytest.raises(StorageNotFoundError, match="does not exist"):
        LocalStorage(tmp_path / "missing").walk(IMAGE_EXTENSIONS)


# --- reads, writes, exists, remove --------------------------------------------------------------

def test_s3_read_write_exists_remove(s3_server, bucket):
    store = open_storage(f"s3://{bucket}/out/run-1", s3_server.options())
    assert not store.exists("_READY")
    store.write_atomic("labels/a.txt", "0 0.5 0.5 0.1 0.1\n")
    store.write_atomic("labels/a.txt", "1 0.5 0.5 0.1 0.1\n")  # replaced whole
    store.write_atomic("_READY", b"")
    assert store.exists("_READY") and store.exists("labels/a.txt")
    assert store.read_bytes("labels/a.txt") == b"1 0.5 0.5 0.1 0.1\n"
    body = s3_server.client().get_object(Bucket=bucket, Key="out/run-1/labels/a.txt")["Body"]
    assert body.read() == b"1 0.5 0.5 0.1 0.1\n"  # the key layout others (load, the page) read
    assert store.child("labels").read_bytes("a.txt") == b"1 0.5 0.5 0.1 0.1\n"
    with pytest.raises(StorageNotFoundError, match=f"s3://{bucket}/out/run-1/labels/b.txt"):
        store.read_bytes("labels/b.txt")
    with pytest.raises(StorageConfigError):
        store.read_bytes("../run-2/x")
    sibling = open_storage(f"s3://{bucket}/out/run-10", s3_server.options())
    sibling.write_atomic("keep.txt", b"k")
    store.remove_tree()
    store.remove_tree()  # nothing there: not an error
    assert not store.exists("labels/a.txt") and not store.exists("_READY")
    assert sibling.read_bytes("keep.txt") == b"k"  # "run-1" is not a prefix of "run-10/"


def test_s3_read_is_one_plain_get(s3_server, bucket):
    """An image read costs one request and no checksum of its bytes on either side
    (bench/README.md: the HEAD and the CRC32 were ~3 ms of CPU per image, client and server)."""
    _put(s3_server, bucket, {"drop/a.jpg": os.urandom(300_000)})
    store = open_storage(f"s3://{bucket}/drop", s3_server.options())
    assert store.exists("a.jpg")  # the client and its connection exist from here on
    sent: list[tuple[str, str | None]] = []
    store._fs.s3.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(
            (request.method, request.headers.get("x-amz-checksum-mode"))))
    assert len(store.read_bytes("a.jpg")) == 300_000
    assert sent == [("GET", None)]


def test_s3_concurrent_overwrites_are_whole(s3_server, bucket):
    """Readers racing writers of the same key see one whole version, never a mix or a part."""
    store = open_storage(f"s3://{bucket}", s3_server.options())
    versions = [bytes([i]) * 300_000 for i in range(1, 5)]
    store.write_atomic("x.bin", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.read_bytes("x.bin"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(3):
            for v in versions:
                store.write_atomic("x.bin", v)
    finally:
        stop.set()
        t.join(timeout=60)
    assert seen and all(s in versions for s in seen)


def test_local_write_is_atomic_and_makes_folders(tmp_path):
    store = LocalStorage(tmp_path)
    store.write_atomic("a/b/c.txt", "x")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["c.txt"]  # no temp left
    assert store.exists("a/b/c.txt") and store.read_bytes("a/b/c.txt") == b"x"
    store.remove_tree("a")
    assert not (tmp_path / "a").exists()


def test_read_ahead_order_errors_and_bounded_window(s3_server, bucket):
    _put(s3_server, bucket, {f"r/{i:03d}.jpg": bytes([i]) * 1000 for i in range(40)})
    store = open_storage(f"s3://{bucket}/r", s3_server.options())
    names = [f"{i:03d}.jpg" for i in range(40)] + ["missing.jpg"]
    in_flight = peak = 0
    lock = threading.Lock()

    def read(name: str) -> bytes:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return store.read_bytes(name)
        finally:
            with lock:
                in_flight -= 1

    got = []
    for name, data in read_ahead(read, names, threads=4, window=6):
        time.sleep(0.005)  # a slow consumer: reads must not run further ahead than the window
        got.append((name, data))
    assert [n for n, _ in got] == names
    assert all(d == bytes([i]) * 1000 for i, (_, d) in enumerate(got[:40]))
    assert isinstance(got[-1][1], StorageNotFoundError)
    assert 1 < peak <= 4


def test_read_ahead_grows_with_the_decoders_within_the_connection_pool():
    """More decode threads (a many-core GPU host) get more GETs in flight, as many as one
    storage's connection pool lets run at once (botocore's default pool is 10)."""
    from image_etl.storage.s3 import S3Options
    from image_etl.worker import read_concurrency

    pool = S3Options().s3fs_kwargs()["config_kwargs"]["max_pool_connections"]
    small, big = read_concurrency(2), read_concurrency(24)
    assert big[0] >= 2 * 24 > small[0] >= 8
    assert all(window >= 2 * threads for threads, window in (small, big))
    assert big[0] <= pool


def test_read_ahead_holds_at_most_window_plus_one():
    started: list[int] = []
    gen = read_ahead(lambda i: (started.append(i), b"x")[1], range(1000), threads=2, window=5)
    next(gen)
    time.sleep(0.2)
    assert len(started) <= 6
    gen.close()  # an early stop cancels the rest
    assert len(started) <= 6


# --- errors: one line, the bucket named, no secret -----------------------------------------------

def _assert_clean(exc: BaseException, s3_server, *secrets: str) -> None:
    text = str(exc)
    assert "\n" not in text
    for secret in (s3_server.secret, *secrets):
        assert secret not in text and secret not in repr(exc)
    assert exc.__cause__ is None and exc.__suppress_context__


def test_bad_credentials_name_the_bucket_not_the_secret(s3_server, bucket):
    _put(s3_server, bucket, {"d/a.jpg": b"1"})
    wrong = "wrong-secret-" + "z" * 20
    store = open_storage(f"s3://{bucket}/d", s3_server.options(secret=wrong))
    for call in (lambda: store.walk(IMAGE_EXTENSIONS), lambda: store.read_bytes("a.jpg"),
                 lambda: store.write_atomic("b.txt", b"x"), lambda: store.exists("a.jpg")):
        with pytest.raises(StorageAccessError, match=f"s3://{bucket}/d.*access denied") as err:
            call()
        _assert_clean(err.value, s3_server, wrong)
    unknown_key = open_storage(f"s3://{bucket}/d", s3_server.options(key="AKIANOSUCHKEY0000"))
    with pytest.raises(StorageAccessError, match=bucket) as err:
        unknown_key.walk(IMAGE_EXTENSIONS)
    _assert_clean(err.value, s3_server)


def test_missing_bucket(s3_server):
    store = open_storage("s3://no-such-bucket-here/x", s3_server.options())
    for call in (lambda: store.walk(IMAGE_EXTENSIONS), lambda: store.read_bytes("a.jpg"),
                 lambda: store.exists("_READY")):
        with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket-here' does not exist") \
                as err:
            call()
        _assert_clean(err.value, s3_server)


def test_bad_options_refused_naming_the_option_not_the_value(s3_server):
    store = open_storage("s3://b-ok/x", s3_server.options())
    assert s3_server.secret not in repr(store.options) and s3_server.key not in repr(store.options)
    with pytest.raises(StorageConfigError, match="'secret_key'") as err:
        open_storage("s3://b-ok/x", {"key": "k", "secret_key": "hunter22"})
    assert "hunter22" not in str(err.value)
    with pytest.raises(StorageConfigError, match="key needs its secret"):
        open_storage("s3://b-ok/x", {"key": "k"})
    with pytest.raises(StorageConfigError, match="local path"):
        open_storage("/data/drops", {"key": "k", "secret": "s"})


def test_unreachable_endpoint_is_bounded_and_one_line(s3_server):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_storage("s3://some-bucket/x", s3_server.options(endpoint_url=f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://some-bucket/x: cannot reach .*127.0.0.1:{port}") \
            as err:
        store.walk(IMAGE_EXTENSIONS)
    assert time.monotonic() - started < 60
    _assert_clean(err.value, s3_server)


def test_storage_error_in_a_process_shows_one_line_no_traceback(s3_server, bucket):
    """What a CLI user or a task log sees: the message, not botocore's chained traceback."""
    code = ("import sys\nfrom image_etl.storage import open_storage, StorageError\n"
            f"s = open_storage('s3://{bucket}/d', {{'key': {s3_server.key!r}, 'secret': 'nope-nope', "
            f"'endpoint_url': {s3_server.endpoint_url!r}, 'region_name': 'us-east-1'}})\n"
            "try:\n    s.walk({'.jpg'})\nexcept StorageError as e:\n"
            "    import traceback; traceback.print_exc(); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 3, proc.stderr
    assert "During handling" not in proc.stderr and "botocore" not in proc.stderr.split("\n")[-2]
    assert "nope-nope" not in proc.stderr and s3_server.secret not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("image_etl.storage.errors.StorageAccessError: "
                                                          f"s3://{bucket}/d")


def test_local_open_storage_is_the_path(tmp_path: Path):
    store = open_storage(str(tmp_path))
    assert isinstance(store, LocalStorage) and store.url == str(tmp_path)


# --- IMAGE_ETL_ALLOWED_ROOTS with URL prefixes ---------------------------------------------------

def test_allowed_roots_accept_url_prefixes():
    from image_etl.errors import SettingsError
    from image_etl.settings import absolute_path, env_defaults, storage_location

    roots = env_defaults({"IMAGE_ETL_ALLOWED_ROOTS": "/data:s3://drops/nightly::s3://cam@raw:/mnt/x"}
                         )["allowed_roots"]
    assert [str(r) for r in roots] == ["/data", "s3://drops/nightly", "s3://raw", "/mnt/x"]
    ok = storage_location("drop_dir", "s3://fleet@drops/nightly/2026-11-20", roots)
    assert (ok.bucket, ok.prefix, ok.conn_id) == ("drops", "nightly/2026-11-20", "fleet")
    assert storage_location("output_dir", "s3://raw/anything", roots).bucket == "raw"
    assert storage_location("drop_dir", "/data/a", roots) == Path("/data/a")
    for bad in ("s3://drops/nightly-2/x", "s3://drops/other", "s3://elsewhere/nightly"):
        with pytest.raises(SettingsError, match="invalid parameter drop_dir: .*not under an allowed root"):
            storage_location("drop_dir", bad, roots)
    with pytest.raises(SettingsError, match="invalid parameter drop_dir: .*not under an allowed root"):
        absolute_path("drop_dir", "/etc", roots)
    with pytest.raises(SettingsError, match="invalid parameter output_dir: .*connection id"):
        storage_location("output_dir", "s3://AKIA:secret@drops/nightly/x", roots)
    with pytest.raises(SettingsError, match="allowed_roots: invalid bucket name"):
        env_defaults({"IMAGE_ETL_ALLOWED_ROOTS": "/data:s3://Bad_Bucket/x"})
    # local-only roots refuse every URL; no roots allow any
    with pytest.raises(SettingsError, match="not under an allowed root"):
        storage_location("drop_dir", "s3://drops/nightly/x", (Path("/data"),))
    assert storage_location("drop_dir", "s3://drops/x", ()).prefix == "x"


# --- discover on a bucket ---------------------------------------------------------------------

def test_discover_lists_an_s3_drop_with_settle(s3_server, bucket):
    from image_etl.discover import list_images

    _put(s3_server, bucket, {"2026-11-20/a.jpg": b"1", "2026-11-20/cam/b.png": b"22",
                             "2026-11-20/cam/": b"", "2026-11-20/readme.txt": b"x"})
    store = open_storage(f"s3://{bucket}/2026-11-20", s3_server.options())
    listing = list_images(store, settle_s=0)
    assert [(i.rel_path, i.bytes) for i in listing.images] == [("a.jpg", 1), ("cam/b.png", 2)]
    later = list_images(store, settle_s=3600)  # everything was written just now: next run
    assert later.images == [] and later.unsettled == ["a.jpg", "cam/b.png"]
    assert list_images(open_storage(f"s3://{bucket}/2026-11-21", s3_server.options())).images == []
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-drops' does not exist"):
        list_images(open_storage("s3://no-such-drops/2026-11-20", s3_server.options()))
