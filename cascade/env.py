"""The environment a run was measured in: versions, CPU, GPU, threads and the command line.

Latency numbers mean little without the machine they came from, so every run folder keeps this
(`env.json`) and every benchmark prints it.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture(argv: list[str] | None = None, execution: dict | None = None) -> dict:
    """A JSON-able description of this process's environment; `execution` (a backend's
    `describe()`: backend, workers and the nodes they ran on) is kept under that key."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    try:
        import faiss

        faiss_version = getattr(faiss, "__version__", None)
    except ImportError:
        faiss_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "cascade": _version("cascade-recsys"),
            "torch": torch.__version__,
            "faiss": faiss_version,
            "triton": _version("triton"),
            "polars": _version("polars"),
            "numpy": _version("numpy"),
            "scikit-learn": _version("scikit-learn"),
            "pyarrow": _version("pyarrow"),
            "matplotlib": _version("matplotlib"),
            "typer": _version("typer"),
            "rich": _version("rich"),
            "ray": _version("ray"),
        },
        "cpu": {"model": cpu_model(), "cores": cores, "logical_cpus": os.cpu_count()},
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "command": list(sys.argv if argv is None else argv),
        **({"execution": execution} if execution is not None else {}),
    }
