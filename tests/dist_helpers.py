"""Two gloo processes on CPU for the torch.distributed tests, and the comparisons they share.

``spawn(fn, *args)`` starts 2 processes (torch.multiprocessing, from the fork server) on a free local port; each runs
``fn(rank, *args)`` inside an initialised gloo process group. An assertion failing in a worker fails the test with
the worker's traceback. Each spawn costs the workers' imports (torch, transformers): tests share one spawn across
many checks.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvlm.testing import rel_err, tolerance

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    os.environ.pop("FASTVLM_BACKEND", None)
    torch.set_num_threads(1)  # two workers on the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# imported once by the fork server, inherited by every worker forked from it
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.tensor.parallel",
           "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "fastvlm", "fastvlm.testing",
           "fastvlm.tiny_models", "transformers", "transformers.models.llava.modeling_llava",
           "transformers.models.internvl.modeling_internvl", "transformers.models.qwen2_vl.modeling_qwen2_vl",
           "transformers.trainer", "dist_helpers"]


def spawn(fn, *args):
    """Run ``fn(rank, *args)`` in 2 processes forked from multiprocessing's fork server, which imports ``PRELOAD``
    once per session: the workers skip torch's and transformers' import time (tens of seconds on 2 cores), and,
    unlike workers forked from the test process itself, inherit no OpenMP thread pool (a fork after the parent ran
    multithreaded ops deadlocks the child's first parallel region)."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(_entry, args=(free_port(), fn, args), nprocs=WORLD, join=True, start_method="forkserver")


def check(name, out, ref64, dtype, k, roundings, failures):
    """Compare ``out`` with its float64 reference; collect the failure instead of raising (so that one run reports
    every mismatch)."""
    err = rel_err(out, ref64)
    bound = tolerance(dtype, k, roundings)
    if not (err <= bound):
        failures.append(f"{name}: relative error {err:.3e} > bound {bound:.3e} ({dtype}, K={k})")
    return err


def full(t):
    """A parameter or gradient as one plain tensor (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
