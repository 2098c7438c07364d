"""Caches of derived tensors shared by every call, safe to fill from several threads and to read on several streams.

An entry (an interpolated position table, an index table, concatenated weights) is data that any call could compute
itself; the cache only saves the work. What makes sharing safe:

* An entry is built completely, then published by one assignment (a slot's tuple replaced, a dict entry set under a
  lock), and each call uses the object it read: a lost race computes twice, a reader never gets a half-built entry
  or another key's.
* CUDA: the builder waits for its stream before publishing (once per miss), so a call on another stream never reads
  memory still being written. A call on another stream than the builder's marks the entry's tensors as used by its
  stream (``record_stream``), so an entry dropped while that stream still reads it is not handed back to the
  builder's stream. During CUDA graph capture an entry is computed for the captured call and not published (a
  graph's memory is its own; synchronising is not allowed while capturing), and readers add nothing to the capture.
* Under torch.compile the caller computes in the graph (nothing is read from or written to a cache).
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch


def _cuda_tensors(value, out):
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _cuda_tensors(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _cuda_tensors(v, out)
    return out


def _capturing():
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def publishable(value):
    """``value`` (a tensor or a structure of tensors) made ready for other threads and streams, as an entry for
    ``take``; None when it must not be published (built during CUDA graph capture). An entry holds plain data (the
    builder's stream as its handle), so a module's ``__dict__`` that holds one still deep-copies and pickles."""
    cuda = _cuda_tensors(value, [])
    if not cuda:
        return (value, None, None, ())
    if _capturing():
        return None
    stream = torch.cuda.current_stream(cuda[0].device)
    stream.synchronize()  # complete before any other stream can read it
    return (value, stream.cuda_stream, cuda[0].device, tuple(cuda))


def take(entry):
    """The value of a published entry, for a call on the current stream."""
    value, handle, device, cuda = entry
    if handle is not None:
        current = torch.cuda.current_stream(device)
        if current.cuda_stream != handle and not _capturing():
            for t in cuda:
                t.record_stream(current)
    return value


class _Slot:
    """What ``slot`` keeps in a module's ``__dict__``: the source and its last (key, entry) pairs (never changed
    once stored: a new one replaces it)."""

    def __init__(self, source, entries):
        self.source, self.entries = source, entries


def slot(store, name, source, key, compute, keep=4):
    """A per-module cache in ``store[name]`` (a module's ``__dict__``): the value for ``key`` computed from the
    current ``source`` (e.g. the table's data pointer and version), else ``compute()``, published. Keeps the last
    ``keep`` keys of one source; a new source drops the others. (Anything else found under ``name``, e.g. a cache
    of an older fastvlm in an unpickled model, is replaced.)"""
    held = store.get(name)
    if type(held) is not _Slot or held.source != source:
        held = None
    if held is not None:
        for k, entry in held.entries:
            if k == key:
                return take(entry)
    value = compute()
    entry = publishable(value)
    if entry is not None:
        kept = held.entries[:keep - 1] if held is not None else ()
        store[name] = _Slot(source, ((key, entry),) + kept)
    return value


class _Shared:
    """Least-recently-used cache of a function of hashable arguments (``shared_cache``)."""

    def __init__(self, fn, maxsize):
        self.fn, self.maxsize = fn, maxsize
        self.lock = threading.Lock()
        self.entries = OrderedDict()
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fn(*args)
        with self.lock:
            entry = self.entries.get(args)
            if entry is not None:
                self.entries.move_to_end(args)
        if entry is not None:
            return take(entry)
        value = self.fn(*args)
        entry = publishable(value)
        if entry is not None:
            with self.lock:
                self.entries[args] = entry
                while len(self.entries) > self.maxsize:
                    self.entries.popitem(last=False)
        return value

    def cache_clear(self):
        with self.lock:
            self.entries.clear()


def shared_cache(maxsize):
    """``functools.lru_cache`` for functions that return tensors (or structures of them): the same lookup, safe to
    share between threads and CUDA streams as described above. Positional, hashable arguments only."""
    return lambda fn: _Shared(fn, maxsize)


@shared_cache(64)
def _arange(start, stop, device):
    return torch.arange(start, stop, device=torch.device(device))


def cached_arange(start, stop, device):
    """``torch.arange(start, stop)`` on ``device``, shared between calls (in the graph under torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.arange(start, stop, device=device)
    return _arange(start, stop, str(device))


_ONCE_LOCK = threading.RLock()  # one lock for every ``once`` function: they call each other (no lock order to keep)


class _Once:
    """A function of hashable arguments computed at most once per key (``once``)."""

    def __init__(self, fn):
        self.fn, self.values = fn, {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        try:
            return self.values[args]  # (a dict read: no lock on the usual path)
        except KeyError:
            pass
        with _ONCE_LOCK:
            if args not in self.values:
                self.values[args] = self.fn(*args)
            return self.values[args]

    def cache_clear(self):
        with _ONCE_LOCK:
            self.values.clear()


def once(fn):
    """``functools.lru_cache(maxsize=None)`` for factories whose result must be unique per key (the ``Fused<Original>``
    classes: two threads patching at once must get the same class, or ``isinstance`` and the class-level patch would
    disagree). The first call for a key runs under a lock that every ``once`` function shares (factories call each
    other), so it runs once; later calls read without locking. Positional, hashable arguments only."""
    return _Once(fn)
