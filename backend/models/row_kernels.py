"""Our own linear kernels for AVX-512 CPUs (row_kernels.cpp), built on this machine at run time.

Ours because on the CPU a decode step is a few rows through every weight, and the library kernels pay a
fixed cost per call that small layers never earn back. Measured on this project's 2-core AMD EPYC
(AVX512-BF16, no AMX), SmolLM2-135M's 210 layer matrices for 8 rows: oneDNN on packed weights 9.95-11.39 ms
in bfloat16 (19-21 GB/s) and 16.3 ms in float32, against 5.9-6.7 and 10.4-11.3 ms here (32-40 GB/s);
a 64 x 64 layer costs 2-3 us a call against 12-17. Large prompts run as fast as oneDNN (0.92-1.41x at
32-512 rows). inductor's CPP GEMM templates lost to ATen's kernels when tried (docs/serving.md).

Each output is one accumulator summed over k in a fixed order, so a row's numbers never depend on the other
rows or their count (batch invariance by construction, checked bit for bit in tests). The build needs a C++
compiler and ninja, takes about 25 s once, and is cached across restarts under the cache root
(KernelBuild); until it is ready the app serves on oneDNN and moves to these kernels between replies
(backend.models.packed_weights.adopt_row_kernels). CPUs without AVX512-BF16 keep oneDNN.
Beside the linear layers: a decode step's per-row attention (attend_rows), Llama's RMSNorm (rms_norm) and a
whole decoder layer of the fused step in one call (decoder_layer, backend.decode.fused_step).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_kernels.cpp")
FLAGS = [
    "-O3",
    "-std=c++17",
    "-ffp-contract=off",  # a * b + c rounds twice, as the tensor operations the kernels stand in for do
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
]
OPS = {
    "none": 0,
    "swish": 1,
    "add": 2,
    "mul": 3,
}  # what the kernel does after the product, as oneDNN names it
COLUMNS = 32  # outputs per packed column block (row_kernels.cpp)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class RowsWeight:
    """A layer's weight packed for the row kernels; `linear` computes op(x W^T + b, other)."""

    packed: torch.Tensor  # [out/32, in, 32]: column blocks in the order the kernel reads them
    out_features: int
    kernels: RowKernels

    def linear(self, x, bias, other=None, op: str = "none") -> torch.Tensor:
        return self.kernels.library.linear(
            x.contiguous(), self.packed, self.out_features, bias, other, OPS[op]
        )


class RowKernels:
    """The built library (a Python module with `linear`)."""

    def __init__(self, library):
        self.library = library

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether a layer of this weight runs here: float32, or bfloat16 with an even input length."""
        return weight.dtype in DTYPES and (weight.dtype == torch.float32 or weight.shape[1] % 2 == 0)

    def pack(self, weight: torch.Tensor) -> RowsWeight:
        """Column blocks of 32 outputs (the last padded with zeros), each laid out as the kernel reads it."""
        out_features, in_features = weight.shape
        blocks = -(-out_features // COLUMNS)
        padded = torch.zeros(blocks * COLUMNS, in_features, dtype=weight.dtype)
        padded[:out_features] = weight
        if weight.dtype == torch.bfloat16:  # pairs of k side by side for vdpbf16ps
            packed = padded.view(blocks, COLUMNS, in_features // 2, 2).permute(0, 2, 1, 3)
        else:
            packed = padded.view(blocks, COLUMNS, in_features).permute(0, 2, 1)
        return RowsWeight(packed.contiguous().view(blocks, in_features, COLUMNS), out_features, self)


def unavailable_reason() -> str | None:
    """Why the row kernels cannot be built or run here, or None when they can."""
    if torch.cuda.is_available():
        return "a GPU is present"
    if not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16 instructions"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) here"
    if _ninja() is None:
        return "no ninja here (pip install ninja)"
    return None


def _ninja() -> str | None:
    """ninja on PATH, or the one pip installed beside this interpreter (a venv's bin, not always on PATH)."""
    return shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))


def library_name() -> str:
    """Names the build by what goes into it, so a changed source, flag set or torch builds anew."""
    key = "\n".join([SOURCE.read_text(encoding="utf-8"), " ".join(FLAGS), torch.__version__])
    return "playground_rows_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def build(directory: Path) -> RowKernels:
    """Compile (or load from `directory`, where an earlier build left it) the kernels; raises on failure."""
    from torch.utils import cpp_extension  # imports setuptools: only when a build is wanted

    name = library_name()
    target = Path(directory) / name
    target.mkdir(parents=True, exist_ok=True)
    ninja = _ninja()
    if ninja and shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; pip's ninja sits beside this interpreter when the venv is not active.
        os.environ["PATH"] = f"{Path(ninja).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with open(target / "build.flock", "w") as held:
        # One build at a time across processes. torch's own lock is a file that a process killed mid-build
        # leaves behind, and every later build then waits for it forever; an flock ends with its process.
        fcntl.flock(held, fcntl.LOCK_EX)
        (target / "lock").unlink(missing_ok=True)
        library = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch already loaded: one OpenMP runtime
            build_directory=str(target),
            verbose=False,
        )
    return RowKernels(library)


def is_built(directory: Path) -> bool:
    """Whether an earlier build of these exact kernels is in `directory` (loading it takes well under 1 s)."""
    name = library_name()
    return any((Path(directory) / name).glob(f"{name}*.so"))


class KernelBuild:
    """The row kernels, built once per machine on a thread of their own while the app serves.

    `kernels()` returns them once built (None before, or when they cannot be built here); `reason` says why
    not. `when_ready(callback)` runs callback(kernels) once they are, at once if they already are.
    """

    def __init__(self, directory: Path, enabled: bool = True, builder: Callable[[Path], RowKernels] = build):
        self.directory = Path(directory)
        self._builder = builder
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._kernels: RowKernels | None = None
        self._callbacks: list[Callable[[RowKernels], None]] = []
        self._started = time.monotonic()
        self.seconds: float | None = None  # how long the build (or load) took
        self.reason = "off (--no-row-kernels)" if not enabled else unavailable_reason()
        self.was_cached = self.reason is None and is_built(self.directory)
        if self.reason is not None:
            self._done.set()

    def start(self) -> KernelBuild:
        if not self._done.is_set():
            threading.Thread(target=self._build, name="row-kernels-build", daemon=True).start()
        return self

    def _build(self) -> None:
        try:
            kernels = self._builder(self.directory)
        except Exception as error:  # no build here is no failure: oneDNN serves on
            log.warning("Row kernels could not be built, oneDNN serves on: %s", error)
            lines = str(error).strip().splitlines()  # a compiler's last line says what went wrong
            self.reason = f"the build failed ({lines[-1][:200] if lines else type(error).__name__})"
            kernels = None
        self.seconds = time.monotonic() - self._started
        with self._lock:
            self._kernels = kernels
            callbacks, self._callbacks = self._callbacks, []
            self._done.set()
        if kernels is not None:
            log.info(
                "Row kernels ready in %.1f s (%s)", self.seconds, "cached" if self.was_cached else "built"
            )
            for callback in callbacks:
                callback(kernels)

    def kernels(self, wait: float = 0.0) -> RowKernels | None:
        """The kernels if built; waits up to `wait` seconds for a build still running."""
        self._done.wait(wait)
        return self._kernels

    def when_ready(self, callback: Callable[[RowKernels], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        if self._kernels is not None:
            callback(self._kernels)

    @property
    def building(self) -> bool:
        return not self._done.is_set()

    def text(self) -> str:
        if self._kernels is not None:
            how = "loaded from cache" if self.was_cached else "built"
            return f"row kernels ready ({how} in {self.seconds:.1f} s)"
        if self.building:
            return f"row kernels building ({time.monotonic() - self._started:.0f} s so far; oneDNN meanwhile)"
        return f"row kernels unavailable: {self.reason}"
