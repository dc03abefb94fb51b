"""The process keeps the large blocks it frees (glibc), so a training step's reallocated score
matrices stop faulting their pages in again; `CASCADE_KEEP_FREED_MEMORY=0` leaves malloc alone."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)

# 4 rounds of a 64 MiB tensor written then freed, after 10 warm-up rounds: the page faults the
# 4 rounds took and whether the setting is in effect. (torch asks for aligned blocks, which a freed
# block of the same size cannot serve, so the heap grows over the first rounds until freed
# neighbours merge: the warm-up.)
SCRIPT = """
import resource, torch
from cascade.util.memory import keep_freed_memory
on = keep_freed_memory()
for _ in range(10):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 << 20)
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep: str) -> tuple[str, int]:
    env = {**os.environ, "CASCADE_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    on, kept = faults("1")
    off, returned = faults("0")
    assert (on, off) == ("True", "False")
    assert returned > 2 * pages  # each round maps and faults its 64 MiB afresh
    assert kept < pages // 10  # the rounds reuse the warm-up's blocks
