"""``scripts/gpu_check.py``: it imports and fails cleanly without CUDA, and its checks run on CPU (``--cpu``).

The GPU run itself needs a machine with CUDA (see README, GPUs).
"""
import subprocess
import sys

import pytest
import torch

from procs import ROOT, clean_env

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(ROOT / "scripts" / "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the script would run its GPU checks")
def test_gpu_check_without_cuda_fails_cleanly():
    proc = subprocess.run([sys.executable, SCRIPT], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CUDA is not available" in proc.stdout and "Traceback" not in proc.stderr


def test_gpu_check_dry_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--world", "2", "--out", str(tmp_path)], env=clean_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("engine-gloo", "lightning-gpu", "lightning-gpu-bf16"):
        assert f"PASS {check} " in proc.stdout, proc.stdout
    assert (tmp_path / "gpu_check.json").exists()
