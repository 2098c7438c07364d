"""Drop-in fused Q-Formers: ``FusedBlip2QFormerModel``, ``FusedInstructBlipQFormerModel``,
``FusedInstructBlipVideoQFormerModel``.

Built like the projectors (fastvlm/nn/projector.py): one recipe row per class, ``fused_qformer_class`` makes
``Fused<Original>`` as a subclass of the original (same constructor, parameters, state_dict keys; ``from_module``
shares the original's children). The forward keeps the original's signature and returns
``BaseModelOutputWithPoolingAndCrossAttentions`` (last_hidden_state, pooler_output). Per layer the fused path runs

    self-attention   one GEMM for [query; key; value] (the three Linears' weights concatenated) -> fastvlm attention
                     over queries (+ InstructBLIP's instruction tokens, with their 2-D attention mask)
                     -> linear_residual_layernorm (dense + residual + LayerNorm in one kernel)
    cross-attention  every ``cross_attention_frequency`` layers, query rows only: query GEMM -> attention over the
                     image tokens, whose keys and values come from ONE GEMM over encoder_hidden_states with the
                     key/value weights of every cross-attention layer concatenated -> linear_residual_layernorm
    FFN              intermediate(_query) dense + GELU (fastvlm::mlp_projector) -> output(_query) dense + residual +
                     LayerNorm (linear_residual_layernorm); instruction rows use intermediate / output

Concatenated weights (``_fastvlm_weights``): cached per compute dtype, keyed on every source parameter's
(data_ptr, _version) and on whether autograd records, so an in-place update (optimizer step, ``load_state_dict``,
``copy_``) or a re-assigned parameter rebuilds them. When autograd records, the cached tensors are ``torch.cat`` /
``.to`` outputs with a grad_fn, so gradients reach the original (separate) parameters; those backward nodes save no
tensors, so one cached concatenation serves any number of forward/backward passes until a parameter changes. Under
torch.compile they are built inside the graph on every call. The state_dict never contains them.

Precision: the Q-Former is kept in fp32 by transformers (``_keep_in_fp32_modules``). Default: compute in the
parameters' dtype (fp32), with tf32x3 dots in fastvlm's own kernels. Opt-in bf16: set ``module.fastvlm_compute_dtype =
torch.bfloat16`` (or the environment variable ``FASTVLM_QFORMER_DTYPE=bf16``): activations and cached bf16 copies of
the weights, fp32 accumulation, output cast back to the parameters' dtype. docs/design-qformer.md has its measured
error.

Fallbacks (the original forward runs, the reason is reported through fastvlm._dispatch): attention weights or hidden
states requested, dropout active in training, gradient checkpointing in training, autocast, a child replaced or
hooked, an activation without a kernel, 3-D/4-D masks, batch mismatch between queries and image features, missing
encoder_hidden_states, unknown keyword arguments.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm._cache import slot
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.attention import attention
from fastvlm.ops.linear_norm import linear_residual_layernorm
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name

from . import _plan
from ._base import _FusedBase
from fastvlm._cache import once


@dataclass(frozen=True)
class QFormerRecipe:
    family: str
    module: str
    cls: str
    fused_name: str
    text_input: bool  # InstructBLIP: instruction tokens embedded by ``embeddings`` and appended after the queries
    qformer: bool = True  # marks the recipe kind for fastvlm.patch's probe


_T = "transformers.models."
QFORMER_RECIPES = (
    QFormerRecipe("blip2", _T + "blip_2.modeling_blip_2", "Blip2QFormerModel", "FusedBlip2QFormerModel", False),
    QFormerRecipe("instructblip", _T + "instructblip.modeling_instructblip", "InstructBlipQFormerModel",
                  "FusedInstructBlipQFormerModel", True),
    QFormerRecipe("instructblipvideo", _T + "instructblipvideo.modeling_instructblipvideo",
                  "InstructBlipVideoQFormerModel", "FusedInstructBlipVideoQFormerModel", True),
)

DTYPE_ENV = "FASTVLM_QFORMER_DTYPE"
_DTYPES = {"": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# keyword arguments the fused path understands (others force the original forward)
_KNOWN_KWARGS = ("output_attentions", "output_hidden_states", "return_dict")


def _is_transformers_hook(h):
    return getattr(getattr(h, "func", h), "__module__", "").startswith("transformers.")


def _user_hooks(mod):
    """Forward hooks a user (or PEFT, accelerate) put on ``mod``; transformers' output-capturing hooks, which are
    installed once ``output_attentions`` was asked for and do nothing otherwise, are not counted."""
    hooks = list(mod._forward_hooks.values()) + list(mod._forward_pre_hooks.values())
    return [h for h in hooks if not _is_transformers_hook(h)]


def _version_key(tensors):
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


class _FusedQFormerMixin(_FusedBase):
    _fastvlm_recipe: QFormerRecipe
    _fastvlm_base: type
    fastvlm_compute_dtype = None  # None: the parameters' dtype (or FASTVLM_QFORMER_DTYPE); torch.bfloat16: opt-in

    # ------------------------------------------------------------------------------------------- structure

    def _fastvlm_layers(self):
        return list(self.encoder.layer)

    def _fastvlm_structure(self, hooks=False):
        """Reasons (a list, empty when fusable) from the module's structure alone; with ``hooks``, also the children
        that carry user forward hooks. The structure is read once and kept until a link in the module tree or a
        training flag changes (fastvlm.nn._plan); the hooks are looked at on every call."""
        reasons = []
        for name, mod, own in _plan.cached_plan(self, self._fastvlm_read_structure):
            if hooks and (mod._forward_hooks or mod._forward_pre_hooks) and _user_hooks(mod):
                reasons.append(f"{name} has forward hooks, which the fused path would not call")
            reasons += own
        return reasons

    def _fastvlm_read_structure(self, fp):
        """(name, module, its structure reasons) for every module below this one, in named_modules order."""
        fp.subtree(self)
        out = []
        for name, mod in self.named_modules():
            if not name:
                continue
            reasons = []
            out.append((name, mod, reasons))
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("query", "key", "value", "dense") and type(mod) is not nn.Linear:
                reasons.append(f"{name} is {type(mod).__name__}, not torch.nn.Linear")
            if leaf in ("LayerNorm", "layernorm") and type(mod) is not nn.LayerNorm:
                reasons.append(f"{name} is {type(mod).__name__}, not torch.nn.LayerNorm")
            if leaf in ("intermediate", "intermediate_query") and activation_name(mod.intermediate_act_fn) is None:
                reasons.append(f"{name}'s activation {type(mod.intermediate_act_fn).__name__} has no fused kernel")
        return tuple(out)

    def _fastvlm_call_reasons(self, kwargs, x_ref, enc, masks):
        reasons = self._fastvlm_structure(hooks=True)
        cfg = self.config
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.get(key, getattr(cfg, key, False)):
                reasons.append(f"{key} was requested (the fused path does not materialise them)")
        for key, value in kwargs.items():
            if key not in _KNOWN_KWARGS and value is not None:
                reasons.append(f"keyword argument {key!r} is not supported by the fused path")
        if self.training and (cfg.hidden_dropout_prob > 0 or cfg.attention_probs_dropout_prob > 0):
            reasons.append("dropout is active (module in training mode with p > 0)")
        name = ("is_activation_checkpointing" if hasattr(type(self), "is_activation_checkpointing")
                else "is_gradient_checkpointing")  # the latter warns as deprecated in transformers 5.x
        checkpointing = getattr(self, name, False)
        if self.training and checkpointing:
            reasons.append("gradient checkpointing is enabled in training")
        if x_ref is not None and autocast_on(x_ref.device):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        for name, m in masks:
            if m is not None and m.dim() != 2:
                reasons.append(f"{name} is {m.dim()}-D (the fused path takes 2-D [batch, keys] masks)")
        return reasons

    # ------------------------------------------------------------------------------------------- weights

    def fastvlm_dtype(self):
        """The compute dtype of the fused path (see the module docstring)."""
        dt = self.fastvlm_compute_dtype
        if dt is None:
            env = os.environ.get(DTYPE_ENV, "").strip().lower()
            if env not in _DTYPES:
                raise ValueError(f"{DTYPE_ENV} must be one of {sorted(k for k in _DTYPES if k)}, got {env!r}")
            dt = _DTYPES[env]
        return dt or self._fastvlm_param_dtype()

    def _fastvlm_param_dtype(self):
        return self.encoder.layer[0].attention.output.dense.weight.dtype

    def _fastvlm_sources(self):
        """Every parameter the fused forward reads, in a fixed order (the cache key)."""
        out = []
        for layer in self._fastvlm_layers():
            for mod in layer.modules():
                if isinstance(mod, (nn.Linear, nn.LayerNorm)):
                    out += [mod.weight, mod.bias]
        return out

    def _fastvlm_build(self, dt):
        c = (lambda t: None if t is None else t.to(dt))  # noqa: E731
        layers = []
        kv_w, kv_b, j = [], [], 0
        for layer in self._fastvlm_layers():
            a = layer.attention
            sa = a.attention
            L = dict(
                qkv_w=c(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])),
                qkv_b=c(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])),
                self_out=self._fastvlm_out(a.output, c),
                ffn_q=(c(layer.intermediate_query.dense.weight), c(layer.intermediate_query.dense.bias),
                       activation_name(layer.intermediate_query.intermediate_act_fn)),
                out_q=self._fastvlm_out(layer.output_query, c),
                cross=None, ffn_t=None,
            )
            if getattr(layer, "has_cross_attention", False):
                ca = layer.crossattention.attention
                L["cross"] = j
                L["cross_q"] = (c(ca.query.weight), c(ca.query.bias))
                L["cross_out"] = self._fastvlm_out(layer.crossattention.output, c)
                kv_w += [ca.key.weight, ca.value.weight]
                kv_b += [ca.key.bias, ca.value.bias]
                j += 1
            if hasattr(layer, "intermediate") and hasattr(layer, "output"):
                L["ffn_t"] = (c(layer.intermediate.dense.weight), c(layer.intermediate.dense.bias),
                              activation_name(layer.intermediate.intermediate_act_fn))
                L["out_t"] = self._fastvlm_out(layer.output, c)
            layers.append(L)
        kv = (c(torch.cat(kv_w)), c(torch.cat(kv_b))) if kv_w else None
        return dict(layers=layers, kv=kv, n_cross=j)

    @staticmethod
    def _fastvlm_out(out_mod, c):
        ln = out_mod.LayerNorm
        return c(out_mod.dense.weight), c(out_mod.dense.bias), c(ln.weight), c(ln.bias), float(ln.eps)

    def _fastvlm_weights(self, dt):
        """Concatenated / cast weights for compute dtype ``dt`` (cached unless a gradient is needed)."""
        if torch.compiler.is_compiling():  # part of the graph: no version reads, no graph breaks
            return self._fastvlm_build(dt)
        sources = self._fastvlm_sources()
        track = torch.is_grad_enabled() and any(p.requires_grad for p in sources)

        def build():
            with torch.set_grad_enabled(track):
                return self._fastvlm_build(dt)

        # one entry (a second dtype would hold a second copy of the weights); safe to fill from several threads
        return slot(self.__dict__, "_fastvlm_cache", _version_key(sources), (dt, track), build, keep=1)

    def fastvlm_clear_cache(self):
        self.__dict__.pop("_fastvlm_cache", None)

    def __getstate__(self):  # pickle / deepcopy: the cache (possibly non-leaf autograd tensors) is rebuilt on demand
        state = super().__getstate__()
        state.pop("_fastvlm_cache", None)
        return state

    # ------------------------------------------------------------------------------------------- forward

    def _fastvlm_run(self, x, enc, self_mask, enc_mask, query_length):
        """The fused encoder: x [B, L, H] (compute dtype, after the embedding LayerNorm) -> [B, L, H]."""
        B, L, Hd = x.shape
        W = self._fastvlm_weights(x.dtype)
        cfg = self.config
        nh = cfg.num_attention_heads
        d = Hd // nh
        Lq = query_length
        kv_all = None
        if W["kv"] is not None and Lq > 0:
            Lk = enc.shape[1]
            kv_all = mlp_projector(enc, W["kv"][0], W["kv"][1], act="none").view(B, Lk, 2 * W["n_cross"], nh, d)
        h = x
        for Lw in W["layers"]:
            qkv = mlp_projector(h, Lw["qkv_w"], Lw["qkv_b"], act="none").view(B, L, 3, nh, d)
            o = attention(qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2),
                          key_mask=self_mask)
            dw, db, lw, lb, eps = Lw["self_out"]
            a = linear_residual_layernorm(o.reshape(B, L, Hd), dw, db, h, lw, lb, eps)
            hq, ht = a[:, :Lq], a[:, Lq:]
            parts = []
            if Lq > 0:
                if Lw["cross"] is not None:
                    j = Lw["cross"]
                    q = mlp_projector(hq, *Lw["cross_q"], act="none").view(B, Lq, nh, d).transpose(1, 2)
                    o = attention(q, kv_all[:, :, 2 * j].transpose(1, 2), kv_all[:, :, 2 * j + 1].transpose(1, 2),
                                  key_mask=enc_mask)
                    dw, db, lw, lb, eps = Lw["cross_out"]
                    hq = linear_residual_layernorm(o.reshape(B, Lq, Hd), dw, db, hq, lw, lb, eps)
                parts.append(self._fastvlm_ffn(hq, Lw["ffn_q"], Lw["out_q"]))
            if L > Lq:
                parts.append(self._fastvlm_ffn(ht, Lw["ffn_t"], Lw["out_t"]))
            h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return h

    @staticmethod
    def _fastvlm_ffn(x, ffn, out):
        w1, b1, act = ffn
        mid = mlp_projector(x, w1, b1, act=act)
        dw, db, lw, lb, eps = out
        return linear_residual_layernorm(mid, dw, db, x, lw, lb, eps)

    def _fastvlm_forward(self, fallback, *, input_ids=None, query_embeds=None, query_length=None, attention_mask=None,
                         position_ids=None, encoder_hidden_states=None, encoder_attention_mask=None, kwargs):
        r = self._fastvlm_recipe
        x_ref = query_embeds if query_embeds is not None else encoder_hidden_states
        reasons = self._fastvlm_call_reasons(kwargs, x_ref, encoder_hidden_states,
                                             (("attention_mask", attention_mask),
                                              ("encoder_attention_mask", encoder_attention_mask)))
        if r.text_input:
            Lq = query_embeds.shape[1] if query_embeds is not None else 0
        else:
            if query_embeds is None:
                reasons.append("query_embeds is None")
            Lq = query_length if query_length is not None else (query_embeds.shape[1] if query_embeds is not None
                                                                else 0)
        n_cross = sum(bool(getattr(layer, "has_cross_attention", False)) for layer in self._fastvlm_layers())
        if Lq > 0 and n_cross and encoder_hidden_states is None:
            reasons.append("encoder_hidden_states is missing (cross-attention layers need it)")
        if not reasons and not r.text_input and Lq < query_embeds.shape[1] and not hasattr(self.encoder.layer[0],
                                                                                            "intermediate"):
            reasons.append("rows after query_length need the text FFN, which this Q-Former does not have")
        if not reasons and Lq > 0 and n_cross:
            B = query_embeds.shape[0]
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != B:
                reasons.append(f"encoder_hidden_states {tuple(encoder_hidden_states.shape)} is not [{B}, keys, "
                               "features] (batch must match the queries)")
        if reasons:
            shape = f"q{tuple(query_embeds.shape)}" if query_embeds is not None else ""
            _dispatch.report_fallback(r.fused_name, reasons, shape)
            return fallback()

        pdt = self._fastvlm_param_dtype()
        if r.text_input:
            x = self.embeddings(input_ids=input_ids, position_ids=position_ids, query_embeds=query_embeds)
        else:
            x = query_embeds.to(self.layernorm.weight.dtype)
            x = F.layer_norm(x, self.layernorm.normalized_shape, self.layernorm.weight, self.layernorm.bias,
                             self.layernorm.eps)
        dt = self.fastvlm_dtype()
        x = x.to(dt)
        enc = encoder_hidden_states.to(dt) if encoder_hidden_states is not None else None
        self_mask = None if attention_mask is None else attention_mask.to(x.device) != 0
        enc_mask = None if encoder_attention_mask is None else encoder_attention_mask.to(x.device) != 0
        seq = self._fastvlm_run(x, enc, self_mask, enc_mask, Lq).to(pdt)
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=seq[:, 0, :])
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return out if return_dict else out.to_tuple()

    def _fastvlm_probe_args(self):
        """Random positional forward arguments for ``fastvlm.patch(verify=True)``."""
        p = self.encoder.layer[0].attention.output.dense.weight
        cfg = self.config
        q = torch.randn(2, 8, cfg.hidden_size, device=p.device, dtype=p.dtype)
        enc = torch.randn(2, 9, cfg.encoder_hidden_size, device=p.device, dtype=p.dtype)
        if self._fastvlm_recipe.text_input:  # 3 instruction tokens after the queries
            ids = torch.randint(0, cfg.vocab_size, (2, 3), device=p.device)
            return (ids, None, None, q, enc)
        return (q, None, None, enc)


def _fwd_blip2(self, query_embeds: torch.Tensor, query_length: int | None = None,
               attention_mask: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
               encoder_attention_mask: torch.Tensor | None = None, **kwargs):
    fallback = functools.partial(self._fastvlm_base.forward, self, query_embeds, query_length, attention_mask,
                                 encoder_hidden_states, encoder_attention_mask, **kwargs)
    return self._fastvlm_forward(fallback, query_embeds=query_embeds, query_length=query_length,
                                 attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, kwargs=kwargs)


def _fwd_instructblip(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.LongTensor | None = None, query_embeds: torch.Tensor | None = None,
                      encoder_hidden_states: torch.Tensor | None = None,
                      encoder_attention_mask: torch.Tensor | None = None, **kwargs):
    fallback = functools.partial(self._fastvlm_base.forward, self, input_ids, attention_mask, position_ids,
                                 query_embeds, encoder_hidden_states, encoder_attention_mask, **kwargs)
    if input_ids is None and query_embeds is None:
        return fallback()  # the original raises its own error
    return self._fastvlm_forward(fallback, input_ids=input_ids, query_embeds=query_embeds,
                                 attention_mask=attention_mask, position_ids=position_ids,
                                 encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, kwargs=kwargs)


@once
def fused_qformer_class(recipe: QFormerRecipe):
    """Build (once) the ``Fused<Original>`` Q-Former class of a recipe. Raises ImportError when the original is
    absent."""
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           "state_dict and forward; batched cross-attention K/V, fastvlm attention and fused dense + residual + "
           "LayerNorm.")
    cls = type(recipe.fused_name, (_FusedQFormerMixin, base),
               {"forward": _fwd_instructblip if recipe.text_input else _fwd_blip2, "_fastvlm_recipe": recipe,
                "_fastvlm_base": base, "__doc__": doc, "__module__": "fastvlm.nn"})
    _register_output_recording(cls, base)
    return cls


def _register_output_recording(cls, base):
    """transformers' output capturing (``output_attentions`` / ``output_hidden_states`` on the original forward, our
    fallback) looks its hook specs up by the *instance's* class name, registered in ``PreTrainedModel.__init__``, which
    ``from_module`` does not run: register the fused class under the original's specs."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers release: output capturing then works as it does there
        return
    specs = getattr(base, "_can_record_outputs", None)
    if specs:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), specs)
