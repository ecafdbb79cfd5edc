"""``strategy="codedreduce"`` under the launchers of real clusters: torchrun with several nodes, SLURM's
``srun``, ``mpirun`` and ``horovodrun``.

Each launched test trains 6 steps on 4 processes (2 "nodes" x 2 where the launcher has nodes) from
different initial weights per rank, and checks that every rank ends with the same parameters as a
single-process float32 SGD run on the same global batches (``lit_common.reference_train``).
Plus fast in-process checks of :class:`~lightning_codedreduce.HorovodRunEnvironment` and of the layout
checks (no process group needed).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_common import reference_train
from procs import PY, ROOT, clean_env, free_port, horovodrun_exe, mpi_launcher, mpirun_env, run_all

pytestmark = pytest.mark.timeout(300)

WORKER = str(ROOT / "tests" / "cluster_worker.py")
VENV_BIN = Path(sys.executable).parent


def _check_equivalence(group, world, environment, layout=None):
    """Same parameters on every rank, equal to the single-process reference; the launcher's environment."""
    res = [group.result("equiv", r) for r in range(world)]
    assert {d["hash"] for d in res} == {res[0]["hash"]}, [d["hash"] for d in res]
    assert all(d["world"] == world and d["environment"] == environment for d in res), res[0]["environment"]
    assert [d["rank"] for d in res] == list(range(world))
    for d in res[1:]:
        assert d["init"] == res[0]["init"] and d["batches"] == res[0]["batches"]
    if layout is not None:  # (node_rank, local_rank) per global rank
        assert [(d["node_rank"], d["local_rank"]) for d in res] == layout
    d = res[0]
    assert d["global_step"] == 6
    ref = reference_train(d["init"], [[b[2]] for b in d["batches"]], lr=0.1)
    torch.testing.assert_close(torch.tensor(d["params"]), ref, rtol=1e-5, atol=1e-6)


TWO_BY_TWO = [(0, 0), (0, 1), (1, 0), (1, 1)]


# ---------------------------------------------------------------- torchrun, two agents (two "nodes")
def test_torchrun_two_nodes_c10d(tmp_path):
    """Two ``torchrun`` agents on localhost: --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d."""
    port = free_port()
    env = clean_env()
    agent = [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=codedreduce-{port}", "--max-restarts=0",
             WORKER, "--scenarios", "equiv", "--devices", "2", "--nodes", "2", "--by-name", "--out", str(tmp_path)]
    group = run_all([(agent, env), (agent, env)], tmp_path, timeout=240)
    group.check()
    res = [group.result("equiv", r) for r in range(4)]
    assert sorted((d["node_rank"], d["local_rank"]) for d in res) == TWO_BY_TWO
    _check_equivalence(group, 4, "TorchElasticEnvironment")


# ---------------------------------------------------------------- SLURM (srun's environment)
def _srun_env(rank, ntasks, per_node, job_id, **extra):
    """The variables ``srun --nodes=N --ntasks-per-node=K`` sets for one task (and nothing of MASTER_*)."""
    nodes = ntasks // per_node
    return clean_env(
        SLURM_JOB_ID=str(job_id), SLURM_JOBID=str(job_id), SLURM_JOB_NAME="train", SLURM_STEP_ID="0",
        SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks), SLURM_NTASKS_PER_NODE=str(per_node),
        SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
        SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(rank // per_node),
        SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_CPUS_PER_TASK="1", SLURMD_NODENAME="localhost", **extra)


def test_slurm_srun_environment(tmp_path):
    """4 tasks as ``srun --nodes=2 --ntasks-per-node=2`` starts them: Lightning's SLURMEnvironment takes
    MASTER_ADDR from SLURM_NODELIST and MASTER_PORT from the job id (15000 + its last 4 digits)."""
    port = free_port(15000, 25000)
    job_id = 870000 + (port - 15000)  # Lightning: MASTER_PORT = 15000 + int(str(job_id)[-4:])
    cmd = [PY, WORKER, "--scenarios", "equiv", "--devices", "2", "--nodes", "2", "--by-name", "--out", str(tmp_path)]
    group = run_all([(cmd, _srun_env(r, 4, 2, job_id)) for r in range(4)], tmp_path, timeout=240)
    group.check()
    _check_equivalence(group, 4, "SLURMEnvironment", layout=TWO_BY_TWO)


def test_slurm_layout_mismatch_is_explained(monkeypatch):
    """Tasks per node that do not match Trainer(devices=...): Lightning's hint, raised at Trainer(...)."""
    import pytorch_lightning as pl

    import lightning_codedreduce  # noqa: F401

    for k, v in _srun_env(0, 4, 2, 123).items():
        if k.startswith("SLURM"):
            monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"ntasks-per-node=2.*HINT: Set `devices=2`"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=4, num_nodes=2, logger=False)
    with pytest.raises(ValueError, match=r"--nodes=2.*HINT: Set `num_nodes=2`"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, num_nodes=1, logger=False)


# ---------------------------------------------------------------- mpirun
def test_mpirun(tmp_path):
    """``mpirun -np 4 python train.py``: Lightning's MPIEnvironment (mpi4py) with strategy="codedreduce"."""
    mpirun, python = mpi_launcher()
    cmd = [mpirun, "-np", "4", "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", python, WORKER,
           "--scenarios", "equiv", "--devices", "4", "--by-name", "--out", str(tmp_path)]
    group = run_all([(cmd, mpirun_env())], tmp_path, timeout=240)
    group.check()
    _check_equivalence(group, 4, "MPIEnvironment")


# ---------------------------------------------------------------- horovodrun
def test_horovodrun_gloo(tmp_path):
    """``horovodrun -np 4 -H localhost:4 --gloo python train.py`` with strategy="codedreduce" and the Trainer's
    devices left at their default: HorovodRunEnvironment is selected and takes horovodrun's layout."""
    exe = horovodrun_exe()
    env = clean_env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [exe, "-np", "4", "-H", "localhost:4", "--gloo", PY, WORKER, "--scenarios", "equiv", "--by-name",
           "--out", str(tmp_path)]
    group = run_all([(cmd, env)], tmp_path, timeout=240)
    group.check()
    _check_equivalence(group, 4, "HorovodRunEnvironment", layout=[(0, r) for r in range(4)])


# ---------------------------------------------------------------- HorovodRunEnvironment in-process
HVD = dict(HOROVOD_RANK="1", HOROVOD_SIZE="4", HOROVOD_LOCAL_RANK="1", HOROVOD_LOCAL_SIZE="2",
           HOROVOD_CROSS_RANK="0", HOROVOD_CROSS_SIZE="2", HOROVOD_HOSTNAME="node-a")


def _hvd_env(monkeypatch, **over):
    for var in list(os.environ):
        if var.startswith(("HOROVOD_", "TORCHELASTIC_")) or var in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(var, raising=False)
    for k, v in {**HVD, **over}.items():
        monkeypatch.setenv(k, v)


def test_horovod_environment_reads_ranks(monkeypatch):
    from lightning_codedreduce import HorovodRunEnvironment

    _hvd_env(monkeypatch)
    env = HorovodRunEnvironment()
    assert HorovodRunEnvironment.detect() and env.creates_processes_externally
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 1, 1, 0)
    assert (env.local_world_size(), env.num_nodes()) == (2, 2)
    env.set_global_rank(3)  # horovodrun decides: ignored
    assert env.global_rank() == 1
    env.validate_settings(num_devices=2, num_nodes=2)
    with pytest.raises(ValueError, match=r"set Trainer\(devices=2, num_nodes=2\)"):
        env.validate_settings(num_devices=4, num_nodes=1)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert (env.main_address, env.main_port) == ("10.1.2.3", 29555)  # explicit MASTER_* win
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(RuntimeError, match="set MASTER_ADDR to the host of rank 0"):
        env.main_address  # no rendezvous server (e.g. horovodrun --mpi)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun wins over leftover HOROVOD_* variables
    assert not HorovodRunEnvironment.detect()


def test_horovod_environment_rendezvous(monkeypatch):
    """Rank 0 publishes <host>:<free port> in horovodrun's key-value store; the others read it there."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (its rendezvous server is what horovodrun runs)")
    from horovod.runner.http.http_server import RendezvousServer

    from lightning_codedreduce import HorovodRunEnvironment
    from lightning_codedreduce import environments

    server = RendezvousServer()
    port = server.start()
    try:
        _hvd_env(monkeypatch, HOROVOD_GLOO_RENDEZVOUS_ADDR="127.0.0.1", HOROVOD_GLOO_RENDEZVOUS_PORT=str(port),
                 HOROVOD_RANK="0", HOROVOD_LOCAL_RANK="0", HOROVOD_HOSTNAME="localhost", HOROVOD_CROSS_SIZE="1",
                 HOROVOD_LOCAL_SIZE="4")
        monkeypatch.setattr(environments, "_MAIN_CACHE", {})
        rank0 = HorovodRunEnvironment()
        addr, main_port = rank0.main_address, rank0.main_port
        assert addr == "127.0.0.1" and 1024 <= main_port < 65536
        monkeypatch.setenv("HOROVOD_RANK", "3")
        monkeypatch.setattr(environments, "_MAIN_CACHE", {})
        assert (HorovodRunEnvironment().main_address, HorovodRunEnvironment().main_port) == (addr, main_port)
        # several hosts and rank 0 named "localhost" in -H: it runs where horovodrun runs, the rendezvous address
        monkeypatch.setenv("HOROVOD_RANK", "0")
        monkeypatch.setenv("HOROVOD_CROSS_SIZE", "2")
        monkeypatch.setattr(environments, "_MAIN_CACHE", {})
        assert HorovodRunEnvironment().main_address == "127.0.0.1"
    finally:
        server.stop()


def test_strategy_selects_horovod_environment(monkeypatch):
    """Under horovodrun the strategy picks HorovodRunEnvironment and, with devices/num_nodes left at their
    defaults, horovodrun's layout; a Trainer layout that contradicts it is refused with the fix."""
    import pytorch_lightning as pl

    from lightning_codedreduce import CodedReduceStrategy, HorovodRunEnvironment

    _hvd_env(monkeypatch, HOROVOD_RANK="0", HOROVOD_LOCAL_RANK="0")
    trainer = pl.Trainer(strategy="codedreduce", accelerator="cpu", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy.cluster_environment, HorovodRunEnvironment)
    assert (strategy.num_processes, strategy.num_nodes, strategy.world_size) == (2, 2, 4)
    assert strategy.cluster_environment.creates_processes_externally  # horovodrun started them: no children
    trainer = pl.Trainer(strategy=CodedReduceStrategy(stragglers=0), accelerator="cpu", devices=2, num_nodes=2,
                         logger=False)
    assert isinstance(trainer.strategy.cluster_environment, HorovodRunEnvironment)
    with pytest.raises(ValueError, match=r"horovodrun started 4 processes.*set Trainer\(devices=2, num_nodes=2\)"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=4, logger=False)


def test_torchrun_layout_mismatch_is_explained(monkeypatch):
    """torchrun's variables and a Trainer layout that does not match them: refused at Trainer(...)."""
    import pytorch_lightning as pl

    import lightning_codedreduce  # noqa: F401

    for k, v in dict(RANK="0", LOCAL_RANK="0", GROUP_RANK="0", LOCAL_WORLD_SIZE="2", WORLD_SIZE="4",
                     TORCHELASTIC_RUN_ID="x", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"devices=2.*num_nodes=1.*world size \(4\)"):
        pl.Trainer(strategy="codedreduce", accelerator="cpu", devices=2, num_nodes=1, logger=False)

