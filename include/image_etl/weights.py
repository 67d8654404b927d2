"""Weights files before any model is built: may this run use them, are they usable, and what
is their identity.

Weights are code (a ``.pt`` file is a pickle), so only the deployment chooses where they may
come from: ``model_path`` must lie, symlinks resolved, under one of the model roots
(``IMAGE_ETL_MODEL_ROOTS``), which are separate from the drop folders' roots
(``IMAGE_ETL_ALLOWED_ROOTS``: uploaders write there). Standard library only: discover and the
settings' validation use this without torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

from image_etl.errors import ModelLoadError, SettingsError

__all__ = ["MODEL_ROOTS_ENV", "check_weights_file", "confine_model_path", "model_roots",
           "weights_sha256"]

MODEL_ROOTS_ENV = "IMAGE_ETL_MODEL_ROOTS"
DEPLOYMENT_MODEL_ENV = "IMAGE_ETL_MODEL"


def model_roots(default_model: str | Path, env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The folders weights may come from, symlinks resolved: ``IMAGE_ETL_MODEL_ROOTS``
    (``os.pathsep``-separated absolute paths), else the folder of the deployment's model
    (``IMAGE_ETL_MODEL``, else ``default_model``)."""
    env = os.environ if env is None else env
    listed = [p.strip() for p in env.get(MODEL_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    if not listed:
        listed = [str(Path(env.get(DEPLOYMENT_MODEL_ENV) or default_model).parent)]
    relative = [p for p in listed if not Path(p).is_absolute()]
    if relative:
        raise SettingsError("model_path", f"{MODEL_ROOTS_ENV} must list absolute folders, "
                                          f"got {relative[0]!r}")
    return tuple(Path(os.path.realpath(p)) for p in listed)


def confine_model_path(path: Path, default_model: str | Path,
                       env: Mapping[str, str] | None = None) -> Path:
    """``path`` if, symlinks resolved, it lies under a model root; else SettingsError naming
    ``model_path`` (before any work: nothing has read the file yet)."""
    roots = model_roots(default_model, env)
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        shown = f"{path}" if real == path else f"{path} (→ {real})"
        raise SettingsError("model_path", f"{shown} is not under a model root "
                                          f"({', '.join(map(str, roots))}): weights are code, "
                                          f"only the deployment chooses where they come from "
                                          f"({MODEL_ROOTS_ENV})")
    return path


# torch.save before PyTorch 1.6 wrote a bare pickle that starts with this magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_weights_file(path: str | Path) -> None:
    """Refuse a file that cannot be PyTorch weights, without torch (discover runs this).

    Catches what actually happens to weights files in transit: an empty or truncated copy,
    a Git LFS pointer checked out instead of the file, an HTML error page saved as ``.pt``.
    A well-formed checkpoint that is not an Ultralytics model is caught by
    :func:`image_etl.model.load_model`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        if zipfile.is_zipfile(path):  # the format of torch.save since PyTorch 1.6
            with zipfile.ZipFile(path) as archive:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                    return
            raise ModelLoadError(f"model weights {path} are a zip archive without data.pkl: "
                                 "not a PyTorch checkpoint")
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"cannot read model weights {path}: {exc}") from exc
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return
    if not head:
        why = "the file is empty"
    elif head.startswith(b"version https://git-lfs"):
        why = "it is a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    elif head.startswith(b"PK"):
        why = "a zip archive without its end (truncated: an interrupted download or copy?)"
    else:
        why = f"neither a zip archive nor a pickle (starts with {head[:16]!r})"
    raise ModelLoadError(f"model weights {path} are not a PyTorch checkpoint: {why}")


def weights_sha256(path: str | Path) -> str:
    """A model's identity in the results database: the sha256 of its weights file.

    Remembered per (file, size, modification time): a stage asks more than once (the
    ``{model}`` template, the manifest), and weights files run to hundreds of MB.
    """
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
