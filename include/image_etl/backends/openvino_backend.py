"""OpenVINO for CPU devices: the same weights, about half the CPU time per image.

On a CPU device the model's forward pass competes with JPEG decoding for the same cores, so
every millisecond it saves is throughput. The ``.pt`` file stays the model's identity (its
sha256 keys the results); the OpenVINO IR is a cache derived from it with Ultralytics' own
exporter (dynamic batch and image shape, FP32), built once per weights file and library
versions, offline, under ``IMAGE_ETL_CACHE_DIR`` (default ``~/.cache/image_etl``).

Precision is FP32 unless bf16 is asked for: on CPUs with AVX512-BF16 or AMX, OpenVINO would
otherwise choose bfloat16 by itself and move confidences by ~1e-2. With FP32 the detections
agree with PyTorch's to float rounding (tested: same boxes within a pixel, confidences within
1e-3); bf16 (``precision: bf16``) is for those who want the speed (about 2.3x on AMX for
640 x 640 slices) and accept the rounding.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from image_etl.errors import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE = "openvino"
WHERE = "CPU devices only"


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(device: str) -> bool:
    return device == "cpu"


def precisions(device: str) -> tuple[str, ...]:
    return ("fp32", "bf16") if device == "cpu" else ()


def load(autobackend: Any, *, device: Any, path: Path, sha256: str, precision: str,
         imgsz: int) -> OpenVINOBackend:
    """The IR of the weights at ``path`` (exported once, cached), ready to compile."""
    if precision == "bf16" and not cpu_computes_bf16():
        raise ModelLoadError("precision 'bf16' needs a CPU with AVX512-BF16 or AMX, which "
                             "this worker's CPU lacks; use 'fp32'")
    try:
        return OpenVINOBackend(exported_model(path, sha256, imgsz), precision)
    except Exception as exc:  # unwritable cache, a layer the exporter cannot convert, ...
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ModelLoadError(f"cannot prepare the OpenVINO copy of {path} under "
                             f"{cache_root()} (IMAGE_ETL_CACHE_DIR): {why}; "
                             "runtime 'torch' needs no copy") from exc


def cache_root() -> Path:
    root = os.environ.get("IMAGE_ETL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "image_etl"


def exported_model(weights: Path, sha256: str, imgsz: int) -> Path:
    """The ``.xml`` of the IR for ``weights``, exporting it first if it is not cached yet.

    Several workers may start at once: each exports into its own temporary folder and renames
    it into place; the loser of the race throws its copy away and uses the winner's.
    """
    import openvino
    import ultralytics

    key = f"{sha256[:16]}-ov{openvino.__version__.split('-')[0]}-ul{ultralytics.__version__}"
    final = cache_root() / "openvino" / key
    xml = final / "model.xml"
    if xml.is_file():
        return xml
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        # The exporter writes beside the weights: give it a private copy of them.
        local = work / "model.pt"
        shutil.copyfile(weights, local)
        from ultralytics import YOLO

        log.info("exporting %s to OpenVINO (once per weights file) into %s", weights, final)
        # Written as model_openvino_model/{model.xml, model.bin, metadata.yaml}.
        out = Path(YOLO(str(local)).export(format="openvino", dynamic=True, imgsz=imgsz,
                                           half=False, verbose=False))
        try:
            out.rename(final)
        except OSError:
            if not xml.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return xml


def cpu_computes_bf16() -> bool:
    """Whether this CPU runs bf16 natively (OpenVINO lists it among the CPU plugin's
    capabilities on AVX512-BF16 and AMX parts)."""
    import openvino
    import openvino.properties.device as device_props

    return "BF16" in openvino.Core().get_property("CPU", device_props.capabilities)


MODES = ("sync", "streams")
REQUEST_TIMEOUT_S = 300.0  # the longest one image may take in "streams" mode (a last bound:
# the pipeline's stall watchdog, sized from timeout_per_image_s, normally ends a stuck run first)


class OpenVINOStuckError(RuntimeError):
    """An inference request did not finish within its bound."""


def default_mode() -> str:
    """``IMAGE_ETL_OPENVINO_MODE`` (``sync`` or ``streams``), else ``streams`` (see the class)."""
    mode = os.environ.get("IMAGE_ETL_OPENVINO_MODE", "").strip() or "streams"
    if mode not in MODES:
        raise ValueError(f"invalid parameter IMAGE_ETL_OPENVINO_MODE: {mode!r}; use one of "
                         f"{', '.join(MODES)}")
    return mode


class OpenVINOBackend:
    """Runs the exported model on the CPU; raw predictions come back as a torch tensor.

    :meth:`infer` takes the letterboxed uint8 BGR images as they are (NHWC): the layout
    change, BGR → RGB and the scaling to [0, 1] are compiled into the graph, which saves the
    inference thread several passes over every batch.

    Compiled lazily with the thread count set by :meth:`share_cpu` (default: every core this
    process may use), in one of two modes, neither of which waits without a bound in Python:

    - ``sync``: the whole batch as one synchronous request in LATENCY mode, as
      Ultralytics' own backend runs since it dropped ``AsyncInferQueue``, which "can hang
      indefinitely on Intel and AMD CPUs" (ultralytics#25923). A request that never returns
      is the stall watchdog's to end (``watchdog.py``).
    - ``streams`` (the default, measured in bench/README.md): as many single-thread streams
      as threads (THROUGHPUT), each image its own
      request, each request waited for in short ``wait_for`` steps up to
      :data:`REQUEST_TIMEOUT_S` (then cancelled and reported): a thread that loses its core
      stalls only its own image.

    bench/README.md has the measurement behind the default. Inference releases the GIL, so
    decoding goes on meanwhile.
    """

    runtime = "openvino"

    def __init__(self, xml: Path, precision: str = "fp32", mode: str | None = None) -> None:
        import openvino

        self.xml = xml
        self.precision = {"fp32": "f32", "bf16": "bf16"}[precision]
        self.mode = mode or default_mode()
        if self.mode not in MODES:
            raise ValueError(f"invalid parameter mode: {self.mode!r}; use one of {MODES}")
        self._core = openvino.Core()
        self._model = self._core.read_model(str(xml))
        from image_etl.resources import cpu_count

        self._threads = cpu_count()  # until share_cpu says otherwise
        self._requests: list[Any] | None = None
        self._lock = threading.Lock()
        self.compiled_precision: str | None = None  # what OpenVINO chose, once compiled

    def share_cpu(self, cores: int, decode_threads: int) -> int:
        """Every core, whatever the decoders take. Measured (48 bench images, 2 cores): every
        core beats the leftover one, 13.2 vs 12.3 img/s exact, 32.8 vs 30.4 fast: its idle
        workers sleep rather than spin, and it soaks up the decoders' stalls and the shard's
        tail (measured with per-image streams). Always every core: the thread count never
        differs between attempts."""
        if cores != self._threads:
            self._threads = max(1, cores)
            self._requests = None
        return self._threads

    def warmup(self, hw: tuple[int, int]) -> None:
        pass  # compiled on the first batch

    def _bgr_model(self) -> Any:
        import openvino
        from openvino.preprocess import ColorFormat, PrePostProcessor

        ppp = PrePostProcessor(self._model.clone())
        tensor = ppp.input().tensor()
        tensor.set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
        tensor.set_color_format(ColorFormat.BGR)
        ppp.input().model().set_layout(openvino.Layout("NCHW"))
        steps = ppp.input().preprocess()
        steps.convert_element_type(openvino.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
        return ppp.build()

    def _compile(self) -> list[Any]:
        import openvino.properties as props
        import openvino.properties.hint as hints

        config: dict[str, Any] = {hints.inference_precision: self.precision,
                                  props.inference_num_threads: self._threads}
        if self.mode == "sync":
            config[hints.performance_mode] = hints.PerformanceMode.LATENCY
            streams = 1
        else:
            config[hints.performance_mode] = hints.PerformanceMode.THROUGHPUT
            config[props.num_streams] = streams = self._threads
        compiled = self._core.compile_model(self._bgr_model(), "CPU", config)
        self.compiled_precision = compiled.get_property(hints.inference_precision).to_string()
        return [compiled.create_infer_request() for _ in range(streams)]

    def infer(self, batch: Any) -> Any:
        """uint8 NHWC BGR letterboxed images (numpy) → raw predictions, in batch order."""
        import numpy as np
        import torch

        with self._lock:
            if self._requests is None:
                self._requests = self._compile()
            if self.mode == "sync":
                request = self._requests[0]
                request.infer({0: batch})
                # Copy out: the request reuses its output buffer for the next batch.
                return torch.from_numpy(request.get_output_tensor(0).data.copy())
            return torch.from_numpy(np.concatenate(self._per_image(batch)))

    def _per_image(self, batch: Any) -> list[Any]:
        """``streams`` mode: each image on the next free request, collected in order, every
        wait bounded."""
        import collections

        assert self._requests is not None
        free = list(self._requests)
        running: collections.deque[tuple[int, Any]] = collections.deque()
        outputs: list[Any] = [None] * len(batch)
        start = 0
        while start < len(batch) or running:
            while free and start < len(batch):
                request = free.pop()
                request.start_async({0: batch[start:start + 1]})
                running.append((start, request))
                start += 1
            k, request = running.popleft()
            _wait_bounded(request, [request, *(r for _, r in running)])
            # Copy out: the request reuses its output buffer for its next image.
            outputs[k] = request.get_output_tensor(0).data.copy()
            free.append(request)
        return outputs


def _wait_bounded(request: Any, running: list[Any], step_ms: int = 1000) -> None:
    """Wait for ``request`` in ``step_ms`` steps (``wait_for`` releases the GIL), at most
    :data:`REQUEST_TIMEOUT_S`; past it cancel every running request and raise."""
    import time

    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while not request.wait_for(step_ms):
        if time.monotonic() > deadline:
            for other in running:
                other.cancel()
            raise OpenVINOStuckError(f"an OpenVINO inference request did not finish within "
                                     f"{REQUEST_TIMEOUT_S:.0f} s (runtime openvino, mode streams)")
