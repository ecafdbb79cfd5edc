"""The Lightning-facing core on every supported Lightning: the oldest 2.x minor and the unified package.

``.venv`` has the newest pytorch-lightning (the whole suite runs there). ``make lightning-side`` builds
``.venv-pl-oldest`` (pytorch-lightning 2.5) and ``.venv-lightning`` (``lightning``, imported as
``lightning.pytorch``), side venvs over ``.venv``'s packages; each test here runs the core tests in one of
them with ``CR_LIGHTNING`` naming the namespace: registration, the internals check, DDP equivalence,
the two-rank feature job, a tolerated death, and the straggler monitor.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from lit_common import lightning
from procs import ROOT, clean_env

SIDES = {
    "pytorch_lightning-oldest": (".venv-pl-oldest", "pytorch_lightning", "2.5."),
    "lightning.pytorch": (".venv-lightning", "lightning.pytorch", "2.6."),
}
CORE = [
    "tests/test_lightning_versions.py::test_registration_in_this_namespace",
    "tests/test_lightning_internals.py",
    "tests/test_ddp_equivalence.py::test_same_run_as_ddp[3]",
    "tests/test_strategy.py::test_two_ranks_job_exits_cleanly",
    "tests/test_strategy.py::test_equivalence_two_ranks",
    "tests/test_strategy.py::test_gradient_accumulation",
    "tests/test_strategy.py::test_manual_optimization",
    "tests/test_strategy.py::test_validation_and_logging",
    "tests/test_strategy.py::test_checkpoint_resume_is_exact",
    "tests/test_faults.py::test_dead_leaf_tolerated_s1[step-9]",
    "tests/test_callbacks.py::test_monitor_on_a_codedreduce_run_names_the_delayed_rank",
]


def test_registration_in_this_namespace():
    """``Trainer(strategy="codedreduce")`` in the namespace under test gives that namespace's strategy class."""
    import lightning_codedreduce  # noqa: F401
    from lightning_codedreduce.strategy import strategy_class

    pl = lightning()
    registry = pl.strategies.StrategyRegistry
    assert "codedreduce" in registry and "codedreduce_fork" in registry
    trainer = pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is strategy_class(pl.__name__)
    assert isinstance(trainer.strategy, pl.strategies.DDPStrategy)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("side", SIDES)
def test_core_on_other_lightning(side, tmp_path):
    venv, namespace, version = SIDES[side]
    python = ROOT / venv / "bin" / "python"
    assert python.exists(), f"{venv} is missing: `make lightning-side` builds it (make test does)"
    probe = subprocess.run([str(python), "-c", f"import importlib; print(importlib.import_module({namespace!r}).__version__)"],
                           capture_output=True, text=True, timeout=120, env=clean_env())
    assert probe.stdout.strip().startswith(version), (probe.stdout, probe.stderr[-2000:])
    env = clean_env(CR_LIGHTNING=namespace)
    env.pop("PYTEST_ADDOPTS", None)
    missing = [t for t in CORE if not (ROOT / t.split("::")[0]).exists()]
    assert not missing, missing
    out = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                          *CORE], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=880)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
    print(f"\n{side}: {out.stdout.strip().splitlines()[-1]}")
