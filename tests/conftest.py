"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton (importing torch
does not), so that on a machine without a GPU the real Triton kernels run through the
interpreter; on a GPU they are compiled (the `gpu` tests check the compiled kernel)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, for
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # it and the cascade runs it starts, else
    #                                                the workers' torch threads fight for the cores

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    # Triton on CPU tensors needs the interpreter, which is off where a GPU compiles the kernels
    no_interpreter = pytest.mark.skip(reason="Triton on CPU tensors: TRITON_INTERPRET is off")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        params = getattr(item, "callspec", None)
        cpu_triton = (params is not None and params.params.get("impl") == "triton") or (
            item.name in CPU_TRITON_TESTS)
        if cpu_triton and "gpu" not in item.keywords and not INTERPRETING:
            item.add_marker(no_interpreter)


# tests that run Triton on CPU tensors without an `impl` parameter
CPU_TRITON_TESTS = {"test_state_select_and_impl_attribute", "test_triton_refuses_inputs_that_need_gradients"}


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
