"""What the strategy checks before it trains, each failing early with an error that names the fix:
the constructor's options, the launched world, the plan (the same on every rank) and the model."""
from __future__ import annotations

import importlib
import math
import numbers
import os
import warnings
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..engine.transport import check_transport
from ..environments import horovod_environment_class
from ..plan import CodedReducePlan
from ..plan.layout import DEFAULT_CHUNK_BYTES, LAYOUTS
from ..plan.plan import CODED_SELF, check_int, check_speeds as plan_speeds
from ._common import WarnOnce, log
from .internals import LightningInternals

# DDP constructor options that make no sense without a DistributedDataParallel wrapper
_DDP_ONLY = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
# DDPStrategy constructor options that CodedReduceStrategy passes on
_BASE = ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin", "start_method")


def check_options(branching: int, stragglers: int, code: str, global_batch_size: "int | str | None", timeout: float,
                  seed: int, transport: str) -> None:
    """The constructor's options, with a clear error now rather than at set-up on every rank."""
    CodedReducePlan(1, branching, stragglers, code, seed)
    check_transport(transport)  # "nccl" on a machine without CUDA/NCCL
    if global_batch_size not in (None, "plan") and (isinstance(global_batch_size, bool)
                                                    or not isinstance(global_batch_size, numbers.Integral)
                                                    or global_batch_size < 1):
        raise ValueError(f"global_batch_size must be a positive integer, None (DDP's: devices * num_nodes * "
                         f"batch_size) or 'plan' (derived from the plan), got {global_batch_size!r}")
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"timeout must be a finite, positive number of seconds (how long a silent peer may take "
                         f"before it counts as dead), got {timeout!r}")


def check_speeds(speeds: Any) -> Optional[tuple[float, ...]]:
    """``speeds`` as positive floats (their number is checked against the world size when the plan is built)."""
    if speeds is None:
        return None
    if isinstance(speeds, (str, bytes)) or not hasattr(speeds, "__len__"):
        raise ValueError(f"speeds must be a list of relative speeds, one per rank, got {speeds!r}; "
                         "e.g. speeds=[1, 1, 0.5, 1] when rank 2 takes twice as long per sample")
    return plan_speeds(speeds, len(speeds))


def check_adapt(stragglers: Any, adapt_every: Any, speeds: Any) -> int:
    """``stragglers="auto"``'s options; returns ``adapt_every``."""
    if isinstance(stragglers, str) and stragglers != "auto":
        raise ValueError(f"stragglers must be an integer >= 0 or 'auto' (choose the plan from measurements), "
                         f"got {stragglers!r}")
    every = check_int("adapt_every", adapt_every, 1, "use the number of optimizer steps between plan decisions, e.g. 50")
    if stragglers == "auto" and speeds is not None:
        raise ValueError("stragglers='auto' measures the ranks' speeds itself; leave speeds=None (or fix the plan "
                         "with stragglers=0 and speeds=[...])")
    return every


def check_layout(layout: str, chunk_bytes: int, coded_self: str = "none") -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))} ('auto' picks 'balanced' for "
                         f"bandwidth-bound gradients and 'tree' for small ones), got {layout!r}")
    check_int("chunk_bytes", chunk_bytes, 1024, "use e.g. 1 MiB (1 << 20)")
    if coded_self not in CODED_SELF:
        raise ValueError(f"coded_self must be one of {', '.join(map(repr, CODED_SELF))} (the tree: whose own compute "
                         f"is coded with its children's parts; 'root' tolerates a slow rank 0), got {coded_self!r}")


def check_bucket_cap(bucket_cap_mb: float) -> None:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not 0 <= bucket_cap_mb < float("inf"):
        raise ValueError(f"bucket_cap_mb must be a number of MiB >= 0 (DDP's default is 25; 0 hands the whole "
                         f"gradient in after backward), got {bucket_cap_mb!r}")


def message_bytes(module: Optional[torch.nn.Module]) -> Optional[int]:
    """Bytes of the message reduced every step: the trainable parameters' gradients in float32 (see
    ``gradients.flat_gradient``), which ``layout="auto"`` decides by."""
    if module is None:
        return None
    return 4 * sum(p.numel() + 1 for p in module.parameters() if p.requires_grad)


def ddp_base_options(ddp_kwargs: dict[str, Any], process_group_timeout: Optional[timedelta]) -> dict[str, Any]:
    """The options ``DDPStrategy.__init__`` gets; DistributedDataParallel's own are refused or ignored (warned)."""
    for name in _DDP_ONLY:
        if ddp_kwargs.get(name) is not None:
            raise ValueError(f"{name} is a DistributedDataParallel option; CodedReduceStrategy never wraps the "
                             "model in DDP, so it cannot be used")
    base = {k: v for k, v in ddp_kwargs.items() if k in _BASE}
    ignored = sorted(k for k in ddp_kwargs if k not in _BASE)
    if ignored:
        warnings.warn(f"CodedReduceStrategy ignores the DistributedDataParallel options {ignored}: "
                      "the model is not wrapped in DDP", UserWarning, stacklevel=3)
    if process_group_timeout is not None:
        base["timeout"] = process_group_timeout
    return base


def check_world_size(num_nodes: int, num_processes: int, env: Optional[Any]) -> None:
    """Lightning checks devices * num_nodes against the launcher only when it starts the processes itself:
    check processes started by torchrun, srun, mpirun, horovodrun or by hand (RANK/WORLD_SIZE/LOCAL_RANK),
    and a process group that an earlier fit left initialised, here."""
    expected = num_nodes * num_processes
    launched = None
    if dist.is_available() and dist.is_initialized():
        launched = dist.get_world_size()
    elif env is not None and env.creates_processes_externally:
        if type(env).__name__ == "LightningEnvironment":  # by hand: WORLD_SIZE, if set
            try:
                launched = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
            except ValueError:
                launched = None
        else:  # the launcher's own check first: its hints name the launcher's options
            env.validate_settings(num_devices=num_processes, num_nodes=num_nodes)
            launched = env.world_size()
    if launched is not None and launched != expected:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but the Trainer was configured "
            f"with devices={num_processes} and num_nodes={num_nodes} ({expected} processes); set "
            f"Trainer(devices=..., num_nodes=...) so that devices * num_nodes == {launched}")


def horovodrun_layout(env: Optional[Any], namespace: str, processes: int,
                      parallel_devices: Optional[list[torch.device]]) -> Optional[tuple[list[torch.device], int]]:
    """Under horovodrun, ``Trainer(devices=..., num_nodes=...)`` left at their defaults (``processes == 1``)
    take horovodrun's layout: ``(parallel devices, number of nodes)``, or None to keep the Trainer's."""
    if env is None or not isinstance(env, horovod_environment_class(namespace)):
        return None
    if processes != 1 or env.world_size() == 1:
        return None
    local, nodes = env.local_world_size(), env.num_nodes()
    device = parallel_devices[0] if parallel_devices else torch.device("cpu")
    devices = [torch.device("cuda", i) for i in range(local)] if device.type == "cuda" else [device] * local
    log.info(f"horovodrun: {env.world_size()} processes, {local} per host on {nodes} host(s)")
    return devices, nodes


def build_plan(world_size: int, branching: int, stragglers: int, code: str, seed: int, *, manual: bool,
               warn: WarnOnce, layout: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               gradient_bytes: Optional[int] = None, speeds: Optional[tuple[float, ...]] = None,
               coded_self: str = "none") -> CodedReducePlan:
    """The plan; ``code="auto"`` becomes fractional repetition (0/1 weights) where it must: manual
    optimization (the user back-propagates the loss) and ``Trainer(deterministic=True)`` (reproducible sums).
    ``layout="auto"`` picks the layout by ``gradient_bytes``; under ``deterministic=True`` it takes the
    balanced layout (always reproducible) where the tree's plan is not."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    shape = dict(layout=layout, chunk_bytes=chunk_bytes, gradient_bytes=gradient_bytes, speeds=speeds,
                 coded_self=coded_self)
    plan = None
    if code == "auto" and (manual or deterministic):
        try:
            plan = CodedReducePlan(world_size, branching, stragglers, "frc", seed, **shape)
        except ValueError:  # no 0/1 code for this shape: the default one (a clear error later if manual)
            pass
    plan = plan or CodedReducePlan(world_size, branching, stragglers, code, seed, **shape)
    if deterministic and layout == "auto" and plan.irreproducible_reason() is not None \
            and world_size >= max(3, stragglers + 1):
        why = plan.irreproducible_reason()
        plan = CodedReducePlan(world_size, branching, stragglers, code, seed, layout="balanced", chunk_bytes=chunk_bytes,
                               speeds=speeds)
        plan.layout_reason = "Trainer(deterministic=True), and the tree cannot be reproducible: " + why
        log.info(f"CodedReduce: balanced layout ({plan.layout_reason}); it tolerates slow ranks, not dead ones")
    reason = plan.irreproducible_reason() if deterministic else None
    if reason is not None:
        warn("deterministic", (
            f"Trainer(deterministic=True): this CodedReduce plan ({world_size} ranks, branching={branching}, "
            f"stragglers={stragglers}) cannot give bitwise-reproducible runs: {reason}. Runs agree to float rounding "
            "only; stragglers=0 (or a world size whose code groups have equal subtrees, e.g. 3, 5 or 7 ranks with "
            "branching=3) is reproducible"))
    return plan


def check_same_plan(options: dict[str, Any], plan: CodedReducePlan) -> None:
    """Every rank must build the same plan: compare the options (not only the fingerprint) to say which differs."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = {**options, "plan": plan.fingerprint()}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differ = [k for k in options if any(e[k] != mine[k] for e in every)]
    if differ or any(e["plan"] != mine["plan"] for e in every):
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {e[k]!r}" for r, e in enumerate(every)) for k in differ)
        raise ValueError(
            f"the ranks built different CodedReduce plans ({detail or 'plan fingerprints differ: ' + str([e['plan'] for e in every])}); "
            "every rank must create CodedReduceStrategy with the same branching, stragglers, code, seed, transport, "
            "layout, chunk_bytes and speeds")


def check_materialised(module: Optional[torch.nn.Module]) -> None:
    if module is None:
        return
    from torch.nn.parameter import is_lazy

    lazy = [n for n, p in module.named_parameters() if is_lazy(p)] + [n for n, b in module.named_buffers() if is_lazy(b)]
    if lazy:
        raise ValueError(
            f"the model has parameters that are not initialised yet (lazy modules: {', '.join(lazy[:5])}"
            f"{', ...' if len(lazy) > 5 else ''}). CodedReduce broadcasts rank 0's parameters at set-up and reduces a "
            "fixed set of gradients, so they must exist before fit: run one forward pass with a dummy batch in the "
            "LightningModule's __init__ or setup() hook, or give the layers their input sizes")


def warn_per_step_collectives(trainer: Any, namespace: str, internals: LightningInternals, warn: WarnOnce) -> None:
    """Callbacks that broadcast after every training batch: every step then waits for the slowest rank."""
    callbacks = importlib.import_module(f"{namespace}.callbacks")
    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, callbacks.Timer):
            warn("timer", "The Timer callback broadcasts from rank 0 after every training batch: every step then "
                          "waits for the slowest rank, undoing CodedReduce's straggler tolerance")
        if isinstance(cb, callbacks.ModelCheckpoint) and internals.checkpoints_on_time(cb):
            warn("ckpt_time", "ModelCheckpoint(train_time_interval=...) broadcasts after every training batch: "
                              "every step then waits for the slowest rank")
