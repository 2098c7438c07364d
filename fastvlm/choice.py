"""Never slower than eager: a per-shape choice between an op's Triton kernel and its unfused PyTorch formulation.

The unfused formulation (the op's PyTorch path: the eager module's own ops, GEMMs on cuBLAS) is a candidate beside
the kernel. On a CUDA device, the first call of a shape key times both (CUDA events, a few repetitions after a
warm-up, median) and the faster one runs from then on. The winner is kept in memory and in a small JSON file keyed
by device, versions and shape, so the next process does not time again. ``fastvlm.trace()`` says which candidate ran
and by how much it won.

When it times: FASTVLM_BACKEND=auto (the default), FASTVLM_STRICT unset, CUDA tensors, not while torch.compile traces
and not while a CUDA graph is being captured (then a cached winner is used, else the kernel). FASTVLM_BACKEND=triton
and strict mode always run the kernel; FASTVLM_CHOICE=0 turns the choice off (the kernel always runs, as before). On
CPU nothing changes. The file: ``$FASTVLM_CACHE_DIR/choices.json`` (default ``~/.cache/fastvlm``); JSON only, read
once per process, written atomically; an unreadable file is ignored with a warning. docs/design-choice.md has the
reasoning.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings

import torch

from fastvlm import _dispatch

FILE_VERSION = 1
WARMUP, REPS = 1, 5
KERNEL, EAGER = "triton", "torch"

_lock = threading.Lock()
_memory: dict = {}  # (device key, op, shape key) -> {"winner": ..., "ms": {...}}
_loaded = False
generation = 0  # bumped by forget(): callers that memoise entries compare it


def cache_path() -> str:
    root = os.environ.get("FASTVLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastvlm")
    return os.path.join(root, "choices.json")


def enabled() -> bool:
    return _dispatch.getenv("FASTVLM_CHOICE", "1") not in ("0", "false", "False", "off")


def applies(device) -> bool:
    """Whether ops consult the choice for tensors on ``device`` (CUDA only; tests replace it)."""
    return device.type == "cuda" and enabled()


def can_time(device) -> bool:
    """Whether a first call may time the candidates now (the caller has already checked backend and strict)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


_device_keys: dict = {}


def device_key(device) -> str:
    """The device's name and capability with the torch, triton and fastvlm versions (a new version times again)."""
    idx = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = _device_keys.get((device.type, idx))
    if key is None:
        import triton

        from fastvlm import __version__

        if device.type == "cuda":
            name = f"{torch.cuda.get_device_name(idx)} sm%d.%d" % torch.cuda.get_device_capability(idx)
        else:
            name = device.type
        key = _device_keys[(device.type, idx)] = (f"{name} torch {torch.__version__} triton {triton.__version__} "
                                                  f"fastvlm {__version__}")
    return key


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    path = cache_path()
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != FILE_VERSION:
            return
        for dev, ops in data["entries"].items():
            for op, shapes in ops.items():
                for shape, entry in shapes.items():
                    if entry.get("winner") in (KERNEL, EAGER):
                        _memory.setdefault((dev, op, shape), entry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"fastvlm: ignoring the per-shape choice cache {path} ({type(exc).__name__}: {exc})",
                      stacklevel=3)


def _save():
    path = cache_path()
    entries: dict = {}
    for (dev, op, shape), entry in _memory.items():
        entries.setdefault(dev, {}).setdefault(op, {})[shape] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".choices-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": FILE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the choice still holds for this process
        warnings.warn(f"fastvlm: cannot write the per-shape choice cache {path} ({exc})", stacklevel=3)


def cuda_timer(fn, device) -> float:
    """Median milliseconds of ``fn()`` over REPS repetitions after WARMUP, timed with CUDA events on ``device``."""
    from fastvlm.bench.harness import measure

    with torch.cuda.device(device):
        return measure(fn, warmup=WARMUP, reps=REPS, device="cuda")[0]


timer = cuda_timer  # tests replace it (no GPU on CI)


def lookup(op: str, shape_key: str, device):
    """The cached entry for this key, or None."""
    with _lock:
        _load()
        return _memory.get((device_key(device), op, shape_key))


def decide(op: str, shape_key: str, device, candidates) -> dict:
    """The entry ({"winner", "ms"}) for this key: cached, or timed now from ``candidates`` {KERNEL: fn, EAGER: fn}
    when ``can_time(device)``; without either, the kernel (not recorded, so a later call may still time)."""
    entry = lookup(op, shape_key, device)
    if entry is not None:
        return entry
    if not can_time(device):
        return {"winner": KERNEL, "ms": {}}
    ms = {name: float(timer(fn, device)) for name, fn in candidates.items()}
    entry = {"winner": min(ms, key=ms.get), "ms": ms}
    with _lock:
        _memory[(device_key(device), op, shape_key)] = entry
        _save()
    return entry


_fast: dict = {}  # (op, the op's cheap key) -> (generation, entry): repeat calls skip building the string key


def per_shape(op: str, device, fast_key, shape_key, kernel, eager):
    """The callable an op hands to ``_dispatch.choose_backend``: the entry for this shape, memoised under
    ``fast_key()`` (a hashable tuple of the call's shapes, dtypes and flags); ``shape_key()`` builds the stable string
    key of the file; ``kernel`` / ``eager`` run the two candidates on this call's inputs (no side effects). Nothing
    is built unless the choice applies (CUDA tensors, FASTVLM_BACKEND=auto)."""

    def entry():
        fk = (op, fast_key())
        hit = _fast.get(fk)
        if hit is not None and hit[0] == generation:
            return hit[1]
        found = decide(op, shape_key(), device, {KERNEL: kernel, EAGER: eager})
        if found["ms"]:
            _fast[fk] = (generation, found)
        return found

    return entry


def describe(entry) -> str:
    """'kernel 1.84x faster than eager (timed)' / 'eager ops 1.31x faster than the kernel at this shape (timed)'."""
    ms = entry.get("ms") or {}
    if KERNEL not in ms or EAGER not in ms or min(ms.values()) <= 0:
        return ""
    if entry["winner"] == KERNEL:
        return f"per-shape choice: kernel {ms[EAGER] / ms[KERNEL]:.2f}x faster than eager ops"
    return f"per-shape choice: eager ops {ms[KERNEL] / ms[EAGER]:.2f}x faster than the kernel at this shape"


def forget() -> None:
    """Drop the in-memory choices (the file stays); the next lookup reads the file again. Tests use it."""
    global _loaded, generation
    with _lock:
        _memory.clear()
        _loaded = False
        generation += 1
