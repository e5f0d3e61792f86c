"""Processes under torchrun: which rank this is, how many there are, which device it uses."""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from .checks import check_gpu_seen
from .console import plural

__all__ = ["setup_processes", "teardown_processes", "from_rank0", "any_rank", "env_int",
           "env_world_rank", "rank_device"]


def env_int(name: str, default: int, lo: int = 0) -> int:
    """Environment variable ``name`` (torchrun's WORLD_SIZE, RANK, LOCAL_RANK) as an int
    >= ``lo``, ``default`` where it is unset; else ValueError naming it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo} in the environment (as torchrun "
                         f"sets it), got {raw!r}")
    return v


def env_world_rank() -> tuple:
    """(WORLD_SIZE, RANK) of torchrun's environment: (1, 0) where WORLD_SIZE is unset or 1
    (RANK is then not read: one process is rank 0), RANK 0 where unset; ValueError naming
    the one that is no int, or a RANK outside [0, WORLD_SIZE - 1]."""
    world = env_int("WORLD_SIZE", 1, lo=1)
    if world == 1:
        return 1, 0
    rank = env_int("RANK", 0)
    if rank >= world:
        raise ValueError(f"RANK: expected an int in [0, {world - 1}] (WORLD_SIZE={world}) "
                         f"in the environment, got {os.environ['RANK']!r}")
    return world, rank


def setup_processes(device: Optional[str]):
    """(rank, world, device, owns_group) from torchrun's environment (WORLD_SIZE, RANK,
    LOCAL_RANK) or an existing process group; NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    env_world = env_world_rank()[0]
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else env_world
    dev = rank_device(device, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not initialized:
        # Rank 0 alone samples for FID, draws grids and saves checkpoints while the others
        # wait in the next step's all-reduce: NCCL's default 10-minute watchdog would
        # abort a run whose FID takes longer.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
        owns = True
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, dev, owns


def rank_device(device: Optional[str], world: int) -> torch.device:
    """The device this process trains and samples on: ``device`` 'cpu' or 'cuda', or None
    for CUDA where torch sees a GPU, else the CPU. CUDA under torchrun (``world`` > 1) is
    LOCAL_RANK's GPU, in one process the current GPU; ValueError naming ``device`` where
    LOCAL_RANK has no GPU (set_device would fail on an invalid ordinal), or a LOCAL_RANK
    that is no int >= 0 (checked on every device)."""
    local = env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or None, got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    check_gpu_seen("device")
    if world == 1:
        return torch.device("cuda", torch.cuda.current_device())
    seen = torch.cuda.device_count()
    if local >= seen:
        raise ValueError(f"device: this process is LOCAL_RANK {local} of a machine where "
                         f"torch sees {seen} {plural(seen, 'GPU')}; start at most {seen} "
                         f"{plural(seen, 'process', 'processes')} per machine "
                         f"(torchrun --nproc_per_node={seen})")
    return torch.device("cuda", local)


def teardown_processes(owns: bool, finished: bool) -> None:
    """Ends the process group that :func:`setup_processes` made (``owns``). Ranks that
    ``finished`` first meet at a barrier, so that none tears down while a peer still works
    (rank 0 saves and draws last): a gloo rank whose peer has closed its connections can
    abort on the way out. After an error, no barrier: the others may never come.

    What still holds the group is collected first: DistributedDataParallel (its reducer
    holds the group) sits in reference cycles, which left gloo's real teardown to a later
    collection or the interpreter's exit, after a peer had gone."""
    if not owns:
        return
    import gc

    import torch.distributed as dist
    if finished:
        barrier()
    gc.collect()
    dist.destroy_process_group()


def from_rank0(value):
    """``value`` as rank 0 has it, on every rank (pickled and broadcast): what rank 0
    alone decides, such as which checkpoint a run resumes or samples."""
    import torch.distributed as dist
    found = [value]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce on ``device``: every rank calls
    it at the same point)."""
    import torch.distributed as dist
    found = torch.tensor([float(flag)], device=device)
    dist.all_reduce(found)
    return found.item() > 0


def barrier() -> None:
    """``dist.barrier()``; on NCCL with this process's GPU named (else NCCL guesses it from
    the rank, and torch warns)."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
