"""The connector-to-LLM hand-off inside patched models: image features written straight into ``inputs_embeds``.

transformers' multimodal models embed the text, run ``get_image_features``, check the image-token count in
``get_placeholder_mask`` and ``masked_scatter`` the rows in, then call the language model with ``inputs_embeds``.
``install(model)`` gives each supported inner model (``LlavaModel`` and friends) an instance-level ``forward`` that
does the image branch itself with ``fastvlm.ops.scatter.scatter_image_features`` (one pass over the image rows,
the same count check and error) and then calls the class's own forward with ``inputs_embeds`` and no pixels, so the
language-model part is the original code path. The output's ``image_outputs`` field is set to what
``get_image_features`` returned, or, in releases whose output has ``image_hidden_states`` instead (5.17, 5.18), that
field to the scattered rows, as the original does.

Two ways in, both handled: ``pixel_values`` (a plain forward call, and ``generate`` in 5.17), and
``mm_encoder_outputs={"image": ...}`` (``generate`` from 5.18 on runs ``get_image_features`` before the prefill and
passes its output instead of the pixels): the hand-off then takes the image rows from that output, as the original
forward does, instead of calling ``get_image_features`` itself.

Where it is exact: the family's forward uses ``input_ids`` only to embed the text and to find the image tokens, and
calls ``get_image_features`` in a way each ``HandoffRecipe`` below describes as data (positional and keyword
arguments, defaults taken from the config, ``return_dict``, whether the per-image outputs are concatenated). The
call falls through to the original forward (reported by ``fastvlm.trace()``, never silently wrong) when the inputs
are outside that: no ``input_ids`` or image input, ``inputs_embeds`` given, both pixels and ``mm_encoder_outputs``,
videos, a tuple output. Families whose forward also reads ``input_ids`` elsewhere (Qwen2-VL's rope index, Gemma 3 and
PaliGemma's token-type masks, Idefics' own merger) are listed in ``NOT_EXACT`` and keep their forward.

The wrapper is an instance attribute: nothing in transformers' classes changes, ``remove(model)`` deletes it, and
hooks, ``state_dict`` and ``save_pretrained`` are unaffected.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.ops.scatter import check_token_count, scatter_image_features

OP = "fastvlm.handoff"
_MARK = "_fastvlm_handoff"
_KWARGS = "_fastvlm_handoff_passes_kwargs"  # read from the forward's source at install, not while traced
_IMAGE_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy")
_VIP_LAYERS = ("vision_feature_layer", "vision_feature_layers")


@dataclass(frozen=True)
class HandoffRecipe:
    family: str
    cls: str  # the inner model class (the one whose forward does the masked_scatter)
    positional: tuple = ()  # forward arguments passed positionally to get_image_features, after pixel_values
    # forward arguments passed by keyword; a tuple of names where transformers renamed one (the one the installed
    # forward's signature has is used). Whether the forward also passes its **kwargs is read from its source.
    keywords: tuple = _IMAGE_KWARGS
    return_dict: bool = True  # the forward passes return_dict=True
    concat: bool = False  # pooler_output is a list of per-image tensors that the forward concatenates
    config_defaults: tuple = ()  # keyword arguments the forward fills from the config when None
    needs_none: tuple = ()  # forward arguments that must be None (e.g. videos) for the hand-off to apply
    nonempty_pixels: bool = False  # the forward skips the image branch when pixel_values has no images


RECIPES = (
    HandoffRecipe("llava", "LlavaModel", keywords=_IMAGE_KWARGS + ("image_sizes",), concat=True),
    HandoffRecipe("llava_next", "LlavaNextModel", positional=("image_sizes",), concat=True, nonempty_pixels=True),
    HandoffRecipe("llava_next_video", "LlavaNextVideoModel", positional=("image_sizes",), concat=True,
                  needs_none=("pixel_values_videos",)),
    HandoffRecipe("llava_onevision", "LlavaOnevisionModel", positional=("image_sizes",),
                  keywords=_IMAGE_KWARGS + ("batch_num_images",), concat=True, needs_none=("pixel_values_videos",)),
    # vision_feature_layers in 5.17 and 5.18, vision_feature_layer in 5.24
    HandoffRecipe("vipllava", "VipLlavaModel", keywords=(_VIP_LAYERS,), return_dict=False,
                  config_defaults=_VIP_LAYERS),
    HandoffRecipe("fast_vlm", "FastVlmModel"),
    HandoffRecipe("mistral3", "Mistral3Model", keywords=("vision_feature_layer", "image_sizes"), concat=True),
    HandoffRecipe("aya_vision", "AyaVisionModel"),
    HandoffRecipe("cohere2_vision", "Cohere2VisionModel", keywords=()),
    HandoffRecipe("internvl", "InternVLModel"),
)

NOT_EXACT = {
    "Qwen2VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Qwen2_5_VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Qwen3VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Gemma3Model": "input_ids also build the bidirectional image-token attention mask",
    "PaliGemmaModel": "input_ids also build the prefix attention mask",
    "Idefics2Model": "merges with its own inputs_merger",
    "Idefics3Model": "merges with its own inputs_merger",
    "SmolVLMModel": "merges with its own inputs_merger",
    "Blip2Model": "the Q-Former output goes through language_projection before the merge",
    "Llama4Model": "reads the vision outputs in a version-specific way",
}


def recipe_for(module):
    name = type(module).__name__
    if not type(module).__module__.startswith("transformers."):
        return None
    return next((r for r in RECIPES if r.cls == name), None)


def _image_token_id(config):
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None


def _as_keywords(fn, self, args, kwargs):
    bound = inspect.signature(fn).bind(self, *args, **kwargs)
    out = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("extra positional arguments")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _fallback(self, forward, why, args, kwargs):
    _dispatch.report_fallback(OP, (why,), type(self).__name__, explicit=True)
    return forward(*args, **kwargs)


def _encoded_reason(encoded, pixels):
    """Why the hand-off cannot take ``mm_encoder_outputs`` as given (None when it can): only images, as a
    ``ModelOutput`` with ``pooler_output``, and no pixels beside it (the original raises on both)."""
    if pixels is not None:
        return "both pixel_values and mm_encoder_outputs given"
    if not isinstance(encoded, dict):
        return "mm_encoder_outputs is not a dict"
    if any(value is not None for key, value in encoded.items() if key != "image"):
        return "mm_encoder_outputs holds " + " / ".join(sorted(k for k, v in encoded.items() if v is not None
                                                               and k != "image"))
    if encoded.get("image") is None:
        return "no image in mm_encoder_outputs"
    if getattr(encoded["image"], "pooler_output", None) is None:
        return "mm_encoder_outputs['image'] has no pooler_output"
    return None


@functools.lru_cache(maxsize=None)
def _passes_kwargs(cls):
    """Whether ``cls.forward`` passes its ``**kwargs`` on to ``get_image_features`` (5.24's LlavaModel does, 5.17's
    does not); None when its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get_image_features":
            return any(k.arg is None for k in node.keywords)
    return False


def _reason(config, recipe, kwargs, token_id, encoded):
    """Why the hand-off does not apply to this call (None when it does)."""
    pixels = kwargs.get("pixel_values")
    if encoded is not None:
        why = _encoded_reason(encoded, pixels)
        if why is not None:
            return why
    elif pixels is None:
        return "no pixel_values or mm_encoder_outputs"
    if kwargs.get("input_ids") is None:
        return "no input_ids (inputs_embeds given)"
    if kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds given"
    if any(kwargs.get(name) is not None for name in recipe.needs_none):
        return " / ".join(recipe.needs_none) + " given"
    if recipe.nonempty_pixels and encoded is None and pixels.size(0) == 0:
        return "pixel_values has no images"
    if token_id is None:
        return "config has no image_token_id"
    if kwargs.get("return_dict") is False or (kwargs.get("return_dict") is None
                                               and getattr(config, "return_dict", True) is False):
        return "return_dict=False (tuple output)"
    return None


def _handoff_forward(self, *args, **kwargs):
    recipe = self.__dict__[_MARK]
    forward = functools.partial(type(self).forward, self)
    if args:  # name every argument, as the forward's signature does
        try:
            kwargs = _as_keywords(type(self).forward, self, args, kwargs)
        except TypeError as exc:
            return _fallback(self, forward, f"arguments do not bind to the forward's signature ({exc})", args, kwargs)
    known = set(inspect.signature(type(self).forward).parameters)
    input_ids = kwargs.get("input_ids")
    pixels = kwargs.get("pixel_values")
    # transformers 5.18+: generate encodes the images before the prefill (5.17's forward has no such argument: there
    # it is one of the **kwargs, passed on as the original does)
    encoded = kwargs.get("mm_encoder_outputs") if "mm_encoder_outputs" in known else None
    token_id = _image_token_id(self.config)
    why = _reason(self.config, recipe, kwargs, token_id, encoded)
    pass_kwargs = self.__dict__.get(_KWARGS)
    if why is None and pass_kwargs is None:
        why = "the forward's source cannot be read (how it calls get_image_features)"
    if why is not None:
        return _fallback(self, forward, why, (), kwargs)

    rest = dict(kwargs)
    call_kw = {}
    for spec in recipe.keywords:
        name = next((n for n in ((spec,) if isinstance(spec, str) else spec) if n in known), None)
        if name is None:  # not an argument of this release's forward, so the forward cannot pass it
            continue
        value = rest.pop(name, None)
        if value is None and name in recipe.config_defaults:
            value = getattr(self.config, name)
        call_kw[name] = value
    positional = [rest.pop(name, None) for name in recipe.positional]
    if recipe.return_dict:
        call_kw["return_dict"] = True
    extra = {k: v for k, v in rest.items() if k not in known}  # the forward's **kwargs bucket
    if pass_kwargs:
        call_kw.update(extra)
    for name in ("input_ids", "pixel_values", "inputs_embeds", "mm_encoder_outputs"):
        if name in known:
            rest.pop(name, None)

    inputs_embeds = self.get_input_embeddings()(input_ids)
    if encoded is not None:
        image_outputs = encoded["image"]
    else:
        image_outputs = self.get_image_features(pixels, *positional, **call_kw)
    features = image_outputs.pooler_output
    if recipe.concat or isinstance(features, (list, tuple)):  # 5.17's FastVLM returns a list and concatenates it
        features = torch.cat(features, dim=0)
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    # the image-token count is checked after the language model's launches are queued (no synchronisation in the
    # connector path); a mismatch meanwhile gives NaN rows, never a read past the features, and then the same
    # ValueError as transformers. Not read while a CUDA graph is captured or under torch.compile.
    inputs_embeds, n_tokens = scatter_image_features(inputs_embeds, input_ids == token_id, features, check="lazy")
    if _dispatch.tracing():
        source = "mm_encoder_outputs" if encoded is not None else "pixel_values"
        _dispatch._record(_dispatch.OpRecord(OP, "fastvlm", (),
                                             f"{type(self).__name__} rows{tuple(features.shape)} from {source}"))
    out = forward(input_ids=None, inputs_embeds=inputs_embeds, pixel_values=None, **rest)
    if not _no_host_reads():
        check_token_count(n_tokens, features.numel() // max(features.shape[-1], 1))  # feature rows
    fields = getattr(out, "__dataclass_fields__", {})
    if "image_outputs" in fields or "image_hidden_states" not in fields:  # transformers 5.24
        _set_field(out, "image_outputs", image_outputs)
    else:  # 5.17, 5.18: the output holds the concatenated rows
        _set_field(out, "image_hidden_states", features)
    return out


def _set_field(out, name, value):
    """Set an output field as the original's constructor would (``ModelOutput`` keeps set fields as dict keys too)."""
    if name in getattr(out, "__dataclass_fields__", {}):
        out[name] = value
    else:
        setattr(out, name, value)


def _no_host_reads():
    """True while a CUDA graph is being captured or torch.compile traces (a host read is not allowed there)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def install(model: nn.Module, selected=lambda family: True):
    """Give every supported inner model of ``model`` the hand-off forward. Returns report rows
    (path, class, status, detail) for the inner models found, including those left as they are and why."""
    rows = []
    for name, mod in model.named_modules():
        recipe = recipe_for(mod)
        cls = type(mod).__name__
        if recipe is None:
            if cls in NOT_EXACT and type(mod).__module__.startswith("transformers."):
                rows.append((name, cls, "not swapped", "hand-off: " + NOT_EXACT[cls]))
            continue
        if _MARK in mod.__dict__:
            rows.append((name, cls, "already fused", "hand-off"))
            continue
        if not selected(recipe.family) and not selected("handoff"):
            rows.append((name, cls, "skipped", "not in ops"))
            continue
        mod.__dict__[_MARK] = recipe
        mod.__dict__[_KWARGS] = _passes_kwargs(type(mod))
        mod.forward = _handoff_forward.__get__(mod)
        rows.append((name, cls, "patched", "hand-off: features scattered into inputs_embeds by fastvlm"))
    return rows


def remove(model: nn.Module) -> int:
    """Delete the hand-off forward from every inner model of ``model``; returns how many were removed."""
    n = 0
    for mod in model.modules():
        mod.__dict__.pop(_KWARGS, None)
        if mod.__dict__.pop(_MARK, None) is not None:
            mod.__dict__.pop("forward", None)
            n += 1
    return n


def is_installed(module: nn.Module) -> bool:
    return _MARK in module.__dict__
