"""Every Lightning internal the strategy depends on is checked at set-up: remove one, get an error naming it."""
from __future__ import annotations

import importlib
import subprocess

import pytest

from lightning_codedreduce.strategy import internals
from lightning_codedreduce.strategy.internals import (INTERNALS, LightningInternals, LightningInternalsError,
                                                      lightning_version)

from lit_common import NAMESPACE, lightning


def test_the_installed_lightning_has_every_internal():
    LightningInternals(NAMESPACE).check(lightning().Trainer(logger=False, enable_progress_bar=False))


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.name)
def test_a_missing_internal_stops_with_its_name_and_the_version(internal, monkeypatch):
    trainer = lightning().Trainer(logger=False, enable_progress_bar=False)
    if not internal.module:  # an attribute of the Trainer instance (or of one it holds)
        owner = trainer
        for part in internal.owner.split(".")[1:]:
            owner = getattr(owner, part)
        monkeypatch.setattr(type(owner), internal.attribute, None, raising=False)  # shadow properties too
        monkeypatch.delattr(type(owner), internal.attribute, raising=False)
        if internal.attribute in vars(owner):
            monkeypatch.delattr(owner, internal.attribute)
    else:
        cls = getattr(importlib.import_module(f"{NAMESPACE}.{internal.module}"), internal.owner)
        defined = [k for k in cls.__mro__ if internal.attribute in vars(k)]
        for klass in defined:  # a class attribute (method, property): delete it wherever it is defined
            monkeypatch.delattr(klass, internal.attribute)
        if not defined:  # one that __init__ sets: the source no longer sets it
            original = internals._sets_attribute
            monkeypatch.setattr(internals, "_sets_attribute",
                                lambda klass, name: name != internal.attribute and original(klass, name))
    with pytest.raises(LightningInternalsError) as err:
        LightningInternals(NAMESPACE).check(trainer)
    message = str(err.value)
    assert internal.name in message and lightning_version(NAMESPACE) in message and ">=2.5,<2.7" in message


FIT_WITHOUT_AN_INTERNAL = """
import importlib, torch
from torch.utils.data import DataLoader, TensorDataset
import lightning_codedreduce
pl = importlib.import_module({namespace!r})
training_epoch_loop = importlib.import_module({namespace!r} + ".loops.training_epoch_loop")
from lightning_codedreduce.strategy.internals import LightningInternalsError

del training_epoch_loop._TrainingEpochLoop._broadcast_sigterm_tensor

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

trainer = pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=1, max_steps=1, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False, default_root_dir={root!r})
try:
    trainer.fit(Net(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
except LightningInternalsError as err:
    print("ERROR:", err)
"""


def test_fit_stops_at_set_up_when_an_internal_is_missing(tmp_path):
    """Not silently skipped: a fit (one rank, in a process of its own: it initialises torch.distributed)
    raises before training starts."""
    from procs import PY, ROOT, clean_env, free_port

    code = FIT_WITHOUT_AN_INTERNAL.format(root=str(tmp_path), namespace=NAMESPACE)
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = subprocess.run([PY, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ERROR: " in out.stdout and "_TrainingEpochLoop._broadcast_sigterm_tensor" in out.stdout, out.stdout
