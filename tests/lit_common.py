"""Shared by the tests' workers: the toy task and reference trainer (``lightning_codedreduce.testing``, which
gpu_check uses too) and the Lightning namespace the tests run on."""
import importlib
import os

from lightning_codedreduce.testing import (  # noqa: F401
    DIM, RecordsTraining, flat_params, make_dataset, make_net, param_hash, reference_train)

# CR_LIGHTNING=lightning.pytorch runs the same tests on the unified package (tests/test_lightning_versions.py)
NAMESPACE = os.environ.get("CR_LIGHTNING", "pytorch_lightning")


def lightning():
    """``pytorch_lightning`` or ``lightning.pytorch``, as ``CR_LIGHTNING`` says."""
    return importlib.import_module(NAMESPACE)
