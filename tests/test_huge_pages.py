"""carcli asks PyTorch for transparent huge pages for large CPU tensors (see carcli/__init__)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PAGE_FAULTS = """
import resource
import carcli  # before torch: it asks PyTorch for huge pages
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)
before = faults()
for _ in range(4):
    torch.empty(16 << 20).fill_(1.0)  # 64 MB, as a large tile's activations
print(faults() - before)
"""


def _huge_pages_possible() -> bool:
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    return os.path.exists(path) and "[never]" not in open(path).read()


@pytest.mark.skipif(not _huge_pages_possible(), reason="no transparent huge pages here")
def test_large_tensors_get_huge_pages() -> None:
    """Four 64 MB tensors: 4 KB page faults by the thousand, unless on 2 MB pages."""

    def faults(**env: str) -> int:
        clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        run = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout.split()[-1])

    pages = 4 * (64 << 20) // 4096
    huge, small = faults(), faults(THP_MEM_ALLOC_ENABLE="0")
    print(f"page faults for 4 x 64 MB: {huge} with carcli's default, {small} with it off")
    assert small > pages / 2  # the user's choice wins
    assert huge < pages / 10
