"""The shipped examples run as documented."""
import re
import subprocess
import sys

import pytest

from mp import ROOT, free_port


@pytest.mark.timeout(240)
def test_plain_torch_example_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "examples" / "plain_torch.py"), "--steps", "8",
           "--slow-rank", "3", "--delay", "0.2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    sums = re.findall(r"rank (\d) done: 8 steps, parameter checksum (-?\d+\.\d{10})", out.stdout)  # lines may interleave
    assert len(sums) == 4 and len({s for _, s in sums}) == 1, out.stdout[-2000:]
    assert "step    7  loss/sample" in out.stdout
