"""Two gloo processes on CPU for the torch.distributed tests, and the comparisons they share.

``spawn(fn, *args)`` starts 2 processes (torch.multiprocessing, forked) on a free local port; each runs
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
    torch.set_num_threads(1)  # one thread per worker: a forked child never enters the parent's OpenMP pool
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, warm=()):
    """Run ``fn(rank, *args)`` in 2 processes. The workers are forked from this process, which imports ``warm``
    (module-building callables, e.g. ``testing.build`` calls) first: the workers inherit every import instead of
    paying torch's and transformers' import time again (tens of seconds on 2 cores)."""
    for build in warm:
        build()
    mp.start_processes(_entry, args=(free_port(), fn, args), nprocs=WORLD, join=True, start_method="fork")


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
