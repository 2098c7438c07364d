"""Per-call state of the embedding pairings and of the still-image mode, kept with the call that owns it.

A pairing (fastvlm/nn/embed_pairing.py) joins a parent's inline code to a fused patch embedding's op call: the
parent's wrapped entry point opens a call, the fused embedding takes it (and fuses the pre-norm or positions into
its op call) and hands its output over, and the consumer (the pre-norm, timm's ``_pos_embed``, Qwen3-VL's
``pos_embed``) passes that very tensor through. A still-image call (Qwen-VL's wrapped ``get_image_features``) opens a
call in which the patch embedding may read one frame; a video call opens one in which it may not.

None of this is kept on the modules, which every call shares. Each call is an object on a stack of the calling
thread (``threading.local``), pushed by the entry point and popped when it returns; a module looks up the innermost
open call of its own pair (or embedding) on its thread's stack. Calls from other threads are on other stacks, so
concurrent calls never see each other's hand-off; a nested call gets its own object; nothing is keyed on a device or
stream. Under torch.compile, dynamo traces the push, the hand-off and the pop within the traced call (it supports
``threading.local``), so a compiled graph keeps no per-call state either.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

_local = threading.local()


def _stack():
    calls = getattr(_local, "calls", None)
    if calls is None:
        calls = _local.calls = []
    return calls


@contextmanager
def opened(call):
    """Push ``call`` on this thread's stack for the duration of the block."""
    calls = _stack()
    calls.append(call)
    try:
        yield call
    finally:
        calls.pop()


class _Pair:
    """What a pairing joins, fixed when ``fastvlm.patch`` installs it (not a Module, no per-call state): shared by
    the fused patch embedding, the consumers of its output and the wrapped entry points of one parent."""

    def __init__(self, kind, parent, norm_attr):
        self.kind = kind  # "clip" | "timm" | "pixtral" | "qwen3"
        self.parent = parent
        self.norm_attr = norm_attr  # the parent's consumer attribute ("pre_layrnorm", "norm_pre", "ln_pre", ...)
        self.norm = None  # the paired consumer module installed in the parent (None: timm without a fusable norm)

    def arm(self, taps=None):
        """Open one call of the parent (or one verification probe) on this thread: ``with pair.arm() as call``."""
        return opened(_PairCall(self, taps))


class _PairCall:
    """One armed call of a pair's parent: until the fused embedding takes it (``armed``), then the tensor it handed
    over (``out``) until the consumer took it."""

    def __init__(self, pair, taps):
        self.pair = pair
        self.armed = True
        self.out = None
        self.norm_fused = False
        self.taps = taps  # per-call data: Qwen3-VL's (interp_indices, interp_weights), Pixtral's image_sizes


def _pair_of(module):
    return module.__dict__.get("_fastvlm_pair")


def call_of(module):
    """The innermost open call of ``module``'s pair on this thread, or None."""
    pair = _pair_of(module)
    return None if pair is None else call_for(pair)


def call_for(pair):
    """The innermost open call of ``pair`` on this thread, or None."""
    for call in reversed(_stack()):
        if isinstance(call, _PairCall) and call.pair is pair:
            return call
    return None


def taken(module):
    """The open call of ``module``'s pair if it is still armed (nothing handed over yet), now taken; else None."""
    call = call_of(module)
    if call is None or not call.armed or call.out is not None:
        return None
    call.armed = False
    return call


def hand_off(call, out, norm_fused=True):
    call.out = out
    call.norm_fused = norm_fused


def has_hooks(*mods):
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods if m is not None)


def unexpected(what):
    """A consumer saw something other than the handed-over tensor after the fused embedding already applied its
    part: running the original code now would apply it twice, so stop instead of returning a wrong result."""
    raise RuntimeError(f"fastvlm: an embedding pairing expected {what}; this library version's forward differs "
                       "from the one fastvlm pairs. fastvlm.unpatch(model) restores the model; please report it.")


# ------------------------------------------------------------------------------------------ still images (Qwen-VL)

class _ModeCall:
    """One call of a Qwen-VL model's wrapped ``get_image_features`` (``video=False``) or ``get_video_features``."""

    def __init__(self, embed, video):
        self.embed, self.video = embed, video


def mode_call(embed, video):
    """Open a still-image (or video) call of ``embed`` on this thread."""
    return opened(_ModeCall(embed, video))


def call_mode(embed):
    """"video" inside a video call of ``embed`` on this thread (Qwen3-VL's video path goes through
    ``get_image_features``: the video call wins), "still" inside a still-image call only, else None."""
    mode = None
    for call in _stack():
        if isinstance(call, _ModeCall) and call.embed is embed:
            if call.video:
                return "video"
            mode = "still"
    return mode
