"""The GPU lease: one lock per physical GPU, however CUDA_VISIBLE_DEVICES names it; a bounded
wait that says what it waited for; no descriptor left behind. Without a GPU: the driver's
listing comes from a stand-in ``nvidia-smi`` on PATH (a real process) or is given directly."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from image_etl.devices import lease
from image_etl.gpu_identity import GpuIdentityUnknown, cuda_identities, parse_nvidia_smi_list

from .conftest import ROOT

U0 = "GPU-1f2e3d4c-0000-1111-2222-333344445555"
U1 = "GPU-8a3b9c7d-6666-7777-8888-999900001111"
U2 = "GPU-8a3bffff-aaaa-bbbb-cccc-ddddeeeeffff"
M0 = "MIG-5c6d7e8f-1234-5678-9abc-def012345678"
LISTING = f"""\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: {U0})
GPU 1: NVIDIA H100 80GB HBM3 (UUID: {U1})
"""
MIG_LISTING = LISTING + f"""\
GPU 2: NVIDIA H100 80GB HBM3 (UUID: {U2})
  MIG 1g.10gb     Device  0: (UUID: {M0})
"""


@pytest.mark.parametrize(("visible", "expected"), [
    (None, [U0, U1]),  # unset: every GPU, in the driver's (PCI bus) order
    ("0,1", [U0, U1]),
    ("1", [U1]),  # this process's cuda:0 is the host's second GPU
    ("1,0", [U1, U0]),
    (" 1 , 0 ", [U1, U0]),
    (U1, [U1]),
    (f"{U1},0", [U1, U0]),
    ("GPU-1f2e", [U0]),  # a unique UUID prefix, as CUDA accepts
    (M0, [M0]),
    ("", []),  # no GPU
    ("-1", []),
    ("0,-1,1", [U0]),  # CUDA stops at the first invalid entry
    ("0,7,1", [U0]),
    ("GPU-8a3b", []),  # ambiguous between U1 and U2: invalid
    ("cuda:0", []),
])
def test_cuda_ordinals_map_to_physical_gpus_in_every_form(visible, expected):
    gpus = parse_nvidia_smi_list(MIG_LISTING)
    if visible is None:
        gpus = gpus[:2]  # unset on a MIG host is refused below
    assert cuda_identities(visible, gpus) == expected


def test_identity_unknown_where_the_mapping_would_be_a_guess():
    gpus = parse_nvidia_smi_list(MIG_LISTING)
    assert [g.migs for g in gpus] == [(), (), (M0,)]
    with pytest.raises(GpuIdentityUnknown, match="MIG mode"):
        cuda_identities("2", gpus)
    mixed = parse_nvidia_smi_list(f"GPU 0: NVIDIA A100 (UUID: {U0})\nGPU 1: NVIDIA T4 (UUID: {U1})\n")
    with pytest.raises(GpuIdentityUnknown, match="CUDA_DEVICE_ORDER"):
        cuda_identities("1", mixed)
    assert cuda_identities("1", mixed, "PCI_BUS_ID") == [U1]
    with pytest.raises(GpuIdentityUnknown, match="no GPU listing"):
        cuda_identities("0", None)
    assert cuda_identities(U1, None) == [U1]  # a whole UUID needs no listing


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """A stand-in ``nvidia-smi`` first on PATH; ``set(stdout, rc)`` says what ``-L`` prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def set_output(stdout: str, rc: int = 0) -> None:
        (bin_dir / "out.txt").write_text(stdout)
        script.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 2\ncat "{bin_dir / "out.txt"}"\n'
                          f'exit {rc}\n')
        script.chmod(0o755)

    set_output(LISTING)
    return set_output


def _busy(device: str, lock_dir: Path) -> bool:
    try:
        with lease(device, lock_dir=lock_dir, timeout_s=0.2, poll_s=0.05, local_gpus=2):
            return False
    except TimeoutError:
        return True


def test_the_lease_locks_the_physical_gpu_whatever_index_it_has(fake_smi, tmp_path, monkeypatch):
    locks = tmp_path / "locks"
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with lease("cuda:0", lock_dir=locks, local_gpus=1):
        # Two bare-metal workers on GPU 0 and GPU 1 both see cuda:0: they must not exclude.
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        assert not _busy("cuda:0", locks)
        assert {p.name for p in locks.iterdir()} == {f"gpu-{U0}.lock", f"gpu-{U1}.lock"}
        # The same physical GPU under another name must wait.
        for visible, device in ((U0, "cuda:0"), ("1,0", "cuda:1"), ("GPU-1f2e", "cuda:0")):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
            assert _busy(device, locks), visible
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        assert _busy("cuda:0", locks) and not _busy("cuda:1", locks)


def test_unknown_identity_is_said_and_the_lease_locks_by_index(fake_smi, tmp_path, monkeypatch,
                                                               caplog):
    fake_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level(logging.WARNING, logger="image_etl.devices"):
        with lease("cuda:0", lock_dir=tmp_path, local_gpus=1):
            pass
    assert "GPU identity unknown" in caplog.text and "exited 9" in caplog.text
    assert "couldn't communicate with the NVIDIA driver" in caplog.text
    assert (tmp_path / "cuda-0.lock").is_file()


HOLD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from image_etl.devices import lease
    with lease("cuda:0", lock_dir=Path(sys.argv[1]), holder="run manual__night, shard 1/2"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes it
""")


def test_the_lease_wait_is_bounded_and_names_lock_and_holder(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT)])}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        monkeypatch.setenv("IMAGE_ETL_LEASE_TIMEOUT_S", "0.5")  # no timeout_s given: the default
        outcome: list[BaseException | str] = []

        def wait() -> None:
            try:
                with lease("cuda:0", lock_dir=tmp_path, poll_s=0.05):
                    outcome.append("leased")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "the lease waited past its bound"
        [error] = outcome
        assert isinstance(error, TimeoutError), error
        message = str(error)
        lock = next(tmp_path.glob("*.lock"))
        assert f"lock {lock} held by pid {child.pid} on " in message, message
        assert "run manual__night, shard 1/2" in message and "IMAGE_ETL_LEASE_TIMEOUT_S" in message
    finally:
        child.kill()
        child.wait(timeout=30)


def test_no_descriptor_is_left_open_when_a_lock_cannot_be_opened(fake_smi, tmp_path,
                                                                  monkeypatch):
    fake_smi("", 1)  # identity unknown: lock by index, cuda-0.lock and cuda-1.lock
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "cuda-1.lock").mkdir()  # the second open fails (a folder where the lock goes)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises((OSError, RuntimeError)) as info:  # it names the lock, as it may
        with lease("cuda", lock_dir=tmp_path, local_gpus=2, timeout_s=1):
            pass
    assert len(os.listdir("/proc/self/fd")) == before
    assert str(tmp_path / "cuda-1.lock") in str(info.value)
