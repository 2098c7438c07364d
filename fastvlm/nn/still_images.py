"""Still images for Qwen-VL (``fastvlm.patch(model, still_images=True)``): inside the model's
``get_image_features`` the fused patch embedding reads one of the frames the image processor repeated, against the
time-summed kernel; inside ``get_video_features`` never. Each wrapped call opens a still-image (or video) call on
its own thread (fastvlm/nn/pair_state.py), so concurrent image and video calls of one model keep their own modes.
"""
from __future__ import annotations

from fastvlm.nn.pair_state import mode_call
from fastvlm.nn.patch_embed import _FusedEmbedMixin

_UNDO = "_fastvlm_pair_undo"  # the undo list that ``fastvlm.nn.embed_pairing.unpair_embeddings`` replays


class _StillImageCall:
    """A Qwen-VL model's ``get_image_features`` or (``video=True``) ``get_video_features`` wrapped on the instance.
    Inside an image call the fused patch embedding reads one of the processor's repeated frames against the
    time-summed kernel; inside a video call never, even where the video path goes through ``get_image_features``
    (Qwen3-VL does)."""

    def __init__(self, inner, embed, video=False):
        self.inner, self.embed, self.video = inner, embed, video
        self.__wrapped__ = inner
        self.__doc__ = getattr(inner, "__doc__", None)

    def __setstate__(self, state):  # objects pickled before the mode moved into the call: the flag named the mode
        state.setdefault("video", state.pop("flag", None) == "_fastvlm_video_call")
        self.__dict__.update(state)

    def __call__(self, *args, **kwargs):
        with mode_call(self.embed, self.video):
            return self.inner(*args, **kwargs)


def _set_instance_attr(obj, name, value, undo):
    """Set an instance attribute, recording (object, name, had it, previous value) for ``unpair_embeddings`` (data,
    not closures, so a deep copy of the model undoes on its own objects)."""
    undo.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
    obj.__dict__[name] = value


def enable_still_images(model):
    """Install ``_StillImageCall`` on every module with ``get_image_features``, ``get_video_features`` and a
    ``visual.patch_embed`` that is a fused pre-patchified-rows embedding. Returns report rows."""
    rows = []
    undo = model.__dict__.setdefault(_UNDO, [])
    for path, mod in model.named_modules():
        embed = getattr(getattr(mod, "visual", None), "patch_embed", None)
        if not (hasattr(mod, "get_image_features") and hasattr(mod, "get_video_features")
                and isinstance(embed, _FusedEmbedMixin) and embed._fastvlm_recipe.kind == "rows"):
            continue
        if isinstance(mod.__dict__.get("get_image_features"), _StillImageCall):
            rows.append((path, type(mod).__name__, "still images", "already fused", ""))
            continue
        T = embed.get_submodule(embed._fastvlm_recipe.conv).kernel_size[0]
        if T < 2:
            continue
        _set_instance_attr(mod, "get_image_features", _StillImageCall(getattr(mod, "get_image_features"), embed),
                           undo)
        _set_instance_attr(mod, "get_video_features",
                           _StillImageCall(getattr(mod, "get_video_features"), embed, video=True), undo)
        rows.append((path, type(mod).__name__, "still images", "patched",
                     f"get_image_features: the patch GEMM reads 1 of the {T} repeated frames against the "
                     f"time-summed kernel ({T}x fewer FLOPs); videos keep the full kernel"))
    return rows
