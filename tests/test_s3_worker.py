"""The worker (engine CLI) on a drop in a bucket, against a real S3 server (SeaweedFS).

Images are read from the bucket with concurrent read-ahead, labels and the staging file are
written to the output prefix, a killed attempt is resumed from the staging object it PUT, and
storage problems are one-line errors naming the bucket. No mocks: every call goes over HTTP to
``weed mini`` with S3 authentication on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import DEMO_MODEL, DROP_DATE, ROOT

TIMEOUT_S = 300


def _env(s3_server, **changes: str) -> dict[str, str]:
    """The CLI reaches the bucket through boto's own environment (no Airflow here)."""
    paths = [str(ROOT / "include"), str(ROOT / "plugins"), str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "YOLO_OFFLINE": "1",
           **s3_server.boto_env()}
    env.update(changes)
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "image_etl", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _infer_args(drop: str, out: str, *extra: str) -> list[str]:
    return ["infer", drop, "--out", out, "--model", str(DEMO_MODEL), "--device", "cpu",
            "--batch", "2", *extra]


def _upload(s3_server, bucket: str, folder: Path, prefix: str) -> list[str]:
    client = s3_server.client()
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    for rel in rels:
        client.upload_file(str(folder / rel), bucket, f"{prefix}/{rel}")
    return rels


def _objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/") for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys}


def _staged(body: bytes) -> dict[str, dict]:
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[0]["kind"] == "header"
    return {r["rel_path"]: r for r in lines[1:]}


def _no_secret(s3_server, *texts: str) -> None:
    for text in texts:
        assert s3_server.secret not in text and s3_server.key not in text


def test_cli_reads_a_bucket_drop_and_writes_labels_and_staging_there(s3_server, small_drop,
                                                                     tmp_path):
    bucket = s3_server.new_bucket()
    folder = small_drop / DROP_DATE.isoformat()
    rels = _upload(s3_server, bucket, folder, "drop")
    env = _env(s3_server)
    local = _cli(*_infer_args(str(folder), str(tmp_path / "local")), env=env)
    assert local.returncode == 0, local.stderr
    remote = _cli(*_infer_args(f"s3://{bucket}/drop", f"s3://{bucket}/out",
                               "--staging", f"s3://{bucket}/out/_staged.jsonl",
                               "--summary", str(tmp_path / "summary.json")), env=env)
    assert remote.returncode == 0, remote.stderr
    assert f"{len(rels)} images (0 failed, 0 resumed)" in remote.stdout
    out = _objects(s3_server, bucket, "out")
    labels = {k: v for k, v in out.items() if k.startswith("labels/")}
    assert sorted(labels) == sorted(f"labels/{r[:-4]}.txt" for r in rels)
    # The same bytes as the local run: reading from a bucket changes nothing in the results.
    for key, body in labels.items():
        assert body == (tmp_path / "local" / key).read_bytes(), key
    staged = _staged(out["_staged.jsonl"])
    assert sorted(staged) == rels and all(r["status"] == "ok" for r in staged.values())
    summary = (tmp_path / "summary.json").read_text()
    assert json.loads(summary)["images_dir"] == f"s3://{bucket}/drop"
    _no_secret(s3_server, remote.stdout, remote.stderr, summary, out["_staged.jsonl"].decode())


def test_cli_resumes_a_killed_attempt_from_the_staging_object(s3_server, tmp_path):
    from image_etl import synth

    bucket = s3_server.new_bucket()
    synth.make_drop(tmp_path / "drops", DROP_DATE, 16, width=512, height=3000, seed=11)
    rels = _upload(s3_server, bucket, tmp_path / "drops" / DROP_DATE.isoformat(), "drop")
    args = _infer_args(f"s3://{bucket}/drop", f"s3://{bucket}/out", "--staging",
                       f"s3://{bucket}/runs/shard-000.staged.jsonl", "--decode-workers", "1")
    # A PUT of the staging object after every image, so the kill lands between two of them.
    env = _env(s3_server, IMAGE_ETL_STAGING_FLUSH_IMAGES="1")
    client = s3_server.client()
    victim = subprocess.Popen([sys.executable, "-m", "image_etl", *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    done_before: dict[str, dict] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(done_before) < 4:
            assert victim.poll() is None, "the worker finished before it could be killed"
            assert time.monotonic() < deadline, "no staging object appeared"
            try:
                body = client.get_object(Bucket=bucket, Key="runs/shard-000.staged.jsonl")
                done_before = _staged(body["Body"].read())
            except client.exceptions.NoSuchKey:
                pass
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)  # mid-shard: no close, no final PUT
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        victim.stdout.close()
    assert len(done_before) < len(rels)
    retry = _cli(*args, env=env)
    assert retry.returncode == 0, retry.stderr
    # It resumed from the bucket: at least what the killed attempt had PUT was not redone.
    resumed = int(retry.stdout.split(" resumed)")[0].rsplit(", ", 1)[1])
    assert resumed >= len(done_before)
    assert f"{len(rels) - resumed} images (0 failed, {resumed} resumed)" in retry.stdout
    out = _objects(s3_server, bucket, "out")
    assert sorted(out) == sorted(f"labels/{r[:-4]}.txt" for r in rels)
    staged = _staged(client.get_object(Bucket=bucket, Key="runs/shard-000.staged.jsonl")
                     ["Body"].read())
    assert sorted(staged) == rels
    for rel, record in done_before.items():  # the killed attempt's records were kept as written
        assert staged[rel] == record


def test_cli_bad_credentials_is_one_line_naming_the_bucket(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    wrong = "wrong-secret-0123456789"
    result = _cli(*_infer_args(f"s3://{bucket}/drop", str(tmp_path / "out")),
                  env=_env(s3_server, AWS_SECRET_ACCESS_KEY=wrong))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: s3://{bucket}/drop: "
                                                             "access denied")
    assert "Traceback" not in result.stderr and wrong not in result.stderr + result.stdout


def test_cli_missing_bucket_and_empty_drop(s3_server, tmp_path):
    env = _env(s3_server)
    missing = _cli(*_infer_args("s3://no-such-bucket-x1/drop", str(tmp_path / "out")), env=env)
    assert missing.returncode == 1
    assert "bucket 'no-such-bucket-x1' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bucket = s3_server.new_bucket()
    empty = _cli(*_infer_args(f"s3://{bucket}/nothing", f"s3://{bucket}/out"), env=env)
    assert empty.returncode == 0, empty.stderr
    assert "0 images (0 failed, 0 resumed)" in empty.stdout
    assert _objects(s3_server, bucket, "out") == {}


@pytest.mark.parametrize("flush_images", [3])
def test_object_staging_writer_puts_whole_files_and_resumes(s3_server, tmp_path, flush_images):
    """The staging object is PUT every N images and at close; a new writer resumes from it."""
    from image_etl.sink import ObjectStagingWriter, StagingObject
    from image_etl.storage import open_storage

    bucket = s3_server.new_bucket()
    target = StagingObject(open_storage(f"s3://{bucket}/run", s3_server.options()), "s.jsonl")
    writer = ObjectStagingWriter(target, "fp1", {"model_sha256": "abc"}, flush_s=3600,
                                 flush_images=flush_images)
    assert writer.resume() == {}
    for i in range(4):
        writer.append({"rel_path": f"{i}.jpg", "status": "ok", "detections": []})
    # 3 records PUT (the 4th waits for the next flush), the header first
    assert sorted(_staged(target.storage.read_bytes("s.jsonl"))) == ["0.jpg", "1.jpg", "2.jpg"]
    writer.close()
    assert len(_staged(target.storage.read_bytes("s.jsonl"))) == 4
    again = ObjectStagingWriter(target, "fp1", {"model_sha256": "abc"})
    assert sorted(again.resume()) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    again.close()
    other = ObjectStagingWriter(target, "fp2", {"model_sha256": "abc"})
    assert other.resume() == {}  # other settings: done again, not resumed
    other.close()


def test_allowed_roots_hold_for_urls_and_their_connection():
    from image_etl.settings import SettingsError, parse_allowed_roots, storage_location

    roots = parse_allowed_roots("/data:s3://store_a@drops/nightly:s3://open-b")
    assert storage_location("drop_dir", "s3://store_a@drops/nightly/2026", roots).conn_id == \
        "store_a"
    assert storage_location("drop_dir", "s3://any_conn@open-b/x", roots).bucket == "open-b"
    assert storage_location("drop_dir", "s3://drops/nightly/2026", roots).conn_id is None
    for bad in ("s3://store_b@drops/nightly/2026", "s3://store_a@drops/other",
                "s3://elsewhere/x"):
        with pytest.raises(SettingsError, match="invalid parameter drop_dir: .*not under an "
                                                "allowed root"):
            storage_location("drop_dir", bad, roots)
