"""The run folder's files (manifest, shard lists, staging files, reports) wherever the output
folder is: a local path or an object-storage prefix.

Stages hand each other these files' locations as text (XCom): an absolute path, exactly as
always, or an ``s3://[conn_id@]bucket/key`` URL (a connection id, never a credential). Every
access goes through an ``Opener``: the DAG passes one that derives the storage options from the
Airflow connection inside the task (``include/image_etl_airflow/storage.py``), so options, which hold
secrets, never travel between tasks; the default reaches a bucket with boto's own credential
chain (the CLI and the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from image_etl.atomic_files import atomic_write
from image_etl.storage import (
    BucketNotFoundError,
    LocalStorage,
    ObjectLocation,
    Storage,
    StorageNotFoundError,
    location_text,
    open_storage,
    parse_location,
    shown,
)

Opener = Callable[[str], Storage]


def default_opener(text: str) -> Storage:
    return open_storage(text)


def storage_at(location: Path | ObjectLocation | str, open_: Opener) -> Storage:
    """The storage rooted at ``location`` (a folder or a prefix)."""
    where = parse_location(location) if isinstance(location, str) else location
    return LocalStorage(where) if isinstance(where, Path) else open_(location_text(where))


def join(folder: str, name: str) -> str:
    """``folder/name`` for a path or a URL."""
    where = parse_location(folder)
    return str(where / name) if isinstance(where, Path) else f"{folder.rstrip('/')}/{name}"


def is_local(text: str) -> bool:
    return isinstance(parse_location(text), Path)


def file_at(text: str, open_: Opener) -> tuple[Storage, str]:
    """The storage holding the file ``text`` and the file's name there."""
    where = parse_location(text)
    if isinstance(where, Path):
        return LocalStorage(where.parent), where.name
    folder, _, name = where.prefix.rpartition("/")
    return open_(location_text(dataclasses.replace(where, prefix=folder))), name


def read_json(text: str, open_: Opener) -> Any:
    where = parse_location(text)
    if isinstance(where, Path):
        return json.loads(where.read_text())
    storage, name = file_at(text, open_)
    return json.loads(storage.read_bytes(name))


def write_json(text: str, data: Any, open_: Opener) -> None:
    body = json.dumps(data, ensure_ascii=False, indent=1)
    where = parse_location(text)
    if isinstance(where, Path):
        atomic_write(where, body)
    else:
        storage, name = file_at(text, open_)
        storage.write_atomic(name, body)


def exists(text: str, open_: Opener) -> bool:
    where = parse_location(text)
    if isinstance(where, Path):
        return where.is_file()
    storage, name = file_at(text, open_)
    return storage.exists(name)


@contextlib.contextmanager
def local_run(discovered: Mapping[str, Any], results: list[Mapping[str, Any] | None],
              plan: list[Mapping[str, Any]] | None, open_: Opener
              ) -> Iterator[tuple[dict[str, Any], list[Mapping[str, Any] | None],
                                  list[Mapping[str, Any]] | None]]:
    """The load's view of a run folder in a bucket, as a local run folder: the manifest, the
    shard lists and every staging object copied into a temporary folder (removed on leaving),
    and ``discovered``, ``results`` and ``plan`` pointing there. The load then checks and reads
    them as it reads a local run's files."""
    with tempfile.TemporaryDirectory(prefix="image_etl_run_") as tmp:
        here = Path(tmp)

        def fetch(text: str, must: bool = True) -> str:
            storage, name = file_at(text, open_)
            local = here / name
            try:
                local.write_bytes(storage.read_bytes(name))
            except BucketNotFoundError:
                raise
            except StorageNotFoundError:
                if must:
                    raise
            return str(local)

        local_discovered = {**discovered, "run_dir": tmp, "manifest": fetch(discovered["manifest"])}
        local_results: list[Mapping[str, Any] | None] = [
            None if r is None else {**r, "staging": fetch(r["staging"])} for r in results]
        local_plan: list[Mapping[str, Any]] | None = None
        if plan is not None:
            local_plan = []
            for shard in plan:
                index = int(shard["index"])
                staged = join(shard["run_dir"], f"shard-{index:03d}.staged.jsonl")
                if not (here / Path(staged).name).exists():
                    fetch(staged, must=False)  # a shard that never ran has none
                local_plan.append({**shard, "run_dir": tmp,
                                   "shard_file": fetch(shard["shard_file"])})
        try:
            yield local_discovered, local_results, local_plan
        except Exception as exc:
            if tmp in str(exc):  # an error naming a copied file: say where the file lives
                exc.add_note(f"{tmp} is the load's temporary copy of the run folder "
                             f"{shown(discovered['run_dir'])}")
            raise
