"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton, so that on a
machine without a GPU the real Triton kernels run through the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, for
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # it and the cascade runs it starts, else
    #                                                the workers' torch threads fight for the cores

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    """The shared MovieLens 100k copy (never copied into the repo: its licence forbids it)."""
    p = Path(os.environ.get("CASCADE_ML100K", ML100K))
    if not (p / "u.data").exists():
        pytest.skip(f"MovieLens 100k not found at {p}")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models run faster (much faster on a loaded
    machine), and parallel reductions (embedding gradients) sum in one order, so training twice
    gives bit-identical weights."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
