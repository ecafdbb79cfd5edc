"""The tests' toy task and reference trainer live in ``lightning_codedreduce.testing`` (gpu_check uses them too)."""
from lightning_codedreduce.testing import (  # noqa: F401
    DIM, RecordsTraining, flat_params, make_dataset, make_net, param_hash, reference_train)
