"""The numeric path a run took: what, besides config, seed and data, decides its figures.

The same config and seed give other figures on a CPU whose instruction set selects other kernels. numpy's
default sort orders equal keys differently with AVX-512 than with AVX2, and torch and the BLAS libraries
round in other ways with each kernel. A ranking pipeline turns those last bits into different ties, lists and
early-stopping epochs. ``results.json`` records the path so that runs can be told apart, and
``summarize`` says when the runs it pools took different ones.
"""

from __future__ import annotations

import os
import platform
from typing import Any

# Environment variables that move a library onto another kernel family (README "Results" uses them to
# take the AVX2 paths on an AVX-512 CPU).
PATH_VARIABLES = (
    "NPY_DISABLE_CPU_FEATURES",
    "OPENBLAS_CORETYPE",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
)


def numeric_environment() -> dict[str, Any]:
    """The CPU, the kernel families numpy, torch and the loaded BLAS libraries use on it, the variables
    that chose them, and the versions of the libraries whose kernels those are. Call it after the run:
    BLAS libraries are listed once they are loaded."""
    import numpy
    import torch
    from threadpoolctl import threadpool_info

    blas = sorted(
        f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture')}"
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    )
    return {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "path": {
            "numpy_dispatch": _numpy_dispatch(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": blas,
        },
        "variables": {name: os.environ[name] for name in PATH_VARIABLES if name in os.environ},
        "versions": {"numpy": numpy.__version__, "torch": torch.__version__},
    }


def _numpy_dispatch() -> list[str]:
    """The instruction-set targets numpy was built to dispatch to that this CPU runs and nothing disabled."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    features = umath.__cpu_features__
    return [target for target in umath.__cpu_dispatch__ if features.get(target)]


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows of the processor."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
