"""Fused projectors under torch.distributed data parallelism, on CPU with gloo in 2 processes.

One spawn runs every data-parallel configuration (DDP; DDP with torch.utils.checkpoint; FSDP2 ``fully_shard`` with
a bf16 MixedPrecisionPolicy, ``reshard_after_forward`` on and off; FSDP2 with ``checkpoint_wrapper``) for three
projector shapes (LLaVA's plain MLP, InternVL's LayerNorm in front, Qwen2-VL's 2x2 merged rows), patched and
unpatched: the loss and every gradient against a float64 single-process reference within the derived tolerance,
then an SGD step and the next loss. The same spawn checks a ``torch.distributed.checkpoint`` round trip of a
patched FSDP2 model (keys identical to the unpatched model's, values restored exactly, also into the unpatched
model). DeepSpeed ZeRO-3 detection runs without a process group.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastvlm
from dist_helpers import WORLD, check, full, spawn
from fastvlm import testing

FAMILIES = ("llava", "internvl", "qwen2_vl")
CONFIGS = ("ddp", "ddp+checkpoint", "fsdp2 bf16 reshard", "fsdp2 bf16 keep", "fsdp2 checkpoint_wrapper")
LR = 0.05


class Holder(nn.Module):
    """A model whose connector is the projector (what fastvlm.patch walks), optionally checkpointed."""

    def __init__(self, proj, checkpoint=False):
        super().__init__()
        self.proj = proj
        self.checkpoint = checkpoint

    def forward(self, x):
        if self.checkpoint:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.proj, x, use_reentrant=False)
        return self.proj(x)


def _batch(family, module, rank):
    """Rank ``rank``'s slice of the global batch and its loss weights (the same on every process)."""
    gen = torch.Generator().manual_seed(100 + rank)
    torch.manual_seed(100 + rank)
    x = testing.input_for(family, module)
    with torch.no_grad():
        y = module(x)
    return x, torch.randn(y.shape, generator=gen, dtype=torch.float64) * 2 * y.abs().mean().double()


def _loss(y, target):
    """Mean squared error against a random target (a positive sum: no cancellation in the loss itself)."""
    return (y.to(torch.float64) - target).square().mean()


def _wrap(model, config, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if config.startswith("ddp"):
        model.checkpoint = "checkpoint" in config
        return DistributedDataParallel(model), torch.float32
    if "checkpoint_wrapper" in config:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.proj = checkpoint_wrapper(model.proj)
    if "bf16" in config:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(model.proj, mesh=mesh, mp_policy=mp, reshard_after_forward="reshard" in config)
        return fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward="reshard" in config), torch.bfloat16
    fully_shard(model.proj, mesh=mesh)
    return fully_shard(model, mesh=mesh), torch.float32


def _grads(model):
    """{name in the unwrapped Holder: full gradient}."""
    out = {}
    for n, p in model.named_parameters():
        n = n.replace("_checkpoint_wrapped_module.", "")
        out[n[len("module."):] if n.startswith("module.") else n] = full(p.grad)
    return out


def _reference(orig, family):
    """Float64 single-process loss per rank and gradients of the mean over ranks; the loss after an SGD step."""
    ref = copy.deepcopy(orig).double()
    losses = []
    for r in range(WORLD):
        x, g = _batch(family, orig, r)
        losses.append(_loss(ref(x.double()), g))
    torch.stack(losses).mean().backward()
    grads = {"proj." + n: p.grad for n, p in ref.named_parameters()}
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    after = [_loss(ref(_batch(family, orig, r)[0].double()), _batch(family, orig, r)[1]) for r in range(WORLD)]
    return losses, grads, after


def _run_config(rank, family, orig, config, patched, ref, mesh, failures):
    losses, grads64, after = ref
    model = Holder(copy.deepcopy(orig))
    if patched:
        report = fastvlm.patch(model)
        assert [e.path for e in report.patched] == ["proj"], str(report)
    model, dtype = _wrap(model, config, mesh)
    tag = f"{family} {config} {'patched' if patched else 'original'}"
    x, g = _batch(family, orig, rank)
    with fastvlm.trace() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model(x)
        loss = _loss(y, g)
        loss.backward()
    if patched:  # the fused op ran (PyTorch path on CPU), and the module never fell back to the original forward
        ops = {r.op for r in t.records}
        if "fastvlm::mlp_projector" not in ops or ops - {"fastvlm::mlp_projector"}:
            failures.append(f"{tag}: fused path not taken: {t}")
        views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
        if views:
            failures.append(f"{tag}: {views[0][:120]}")
    k = max(x.shape[-1], x.numel() // x.shape[-1] * WORLD)
    check(f"{tag} loss", loss, losses[rank], dtype, k, 4, failures)
    got = _grads(model)
    if set(got) != set(grads64):
        failures.append(f"{tag}: parameters {sorted(got)} != {sorted(grads64)}")
    for name, g64 in grads64.items():
        check(f"{tag} grad {name}", got[name], g64, dtype, k, 4, failures)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.step()
    opt.zero_grad()
    check(f"{tag} loss after step", _loss(model(x), g), after[rank], dtype, k, 6, failures)
    return model


def _dcp_round_trip(rank, orig, mesh, tmpdir, failures):
    """Save a patched FSDP2 model with torch.distributed.checkpoint; load into fresh patched and unpatched ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    def build(patched, seed):
        m = Holder(testing.randomize_(copy.deepcopy(orig)) if seed else copy.deepcopy(orig))
        if patched:
            fastvlm.patch(m)
        fully_shard(m.proj, mesh=mesh)
        return fully_shard(m, mesh=mesh)

    src = build(True, 0)
    x, g = _batch("internvl", orig, rank)
    _loss(src(x), g).backward()
    torch.optim.SGD(src.parameters(), lr=LR).step()  # saved values differ from the construction's
    sd = get_model_state_dict(src)
    plain_keys = set(get_model_state_dict(build(False, 0)))
    if set(sd) != plain_keys:
        failures.append(f"DCP: patched keys {sorted(sd)} != unpatched keys {sorted(plain_keys)}")
    dcp.save(sd, checkpoint_id=tmpdir)
    want = {k: full(v).clone() for k, v in sd.items()}
    for patched in (True, False):
        dst = build(patched, 1)
        sd2 = get_model_state_dict(dst)
        dcp.load(sd2, checkpoint_id=tmpdir)
        set_model_state_dict(dst, sd2)
        got = {k: full(v) for k, v in get_model_state_dict(dst).items()}
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        if bad or set(got) != set(want):
            failures.append(f"DCP into {'patched' if patched else 'unpatched'}: not restored exactly: {bad}")
        with torch.no_grad():
            y_src, y_dst = src(x), dst(x)
        if not torch.equal(y_src, y_dst):
            failures.append(f"DCP into {'patched' if patched else 'unpatched'}: outputs differ after loading")


def _data_parallel_worker(rank, tmpdir):
    import os

    from torch.distributed.device_mesh import init_device_mesh

    os.environ["FASTVLM_BACKEND"] = "torch"  # the PyTorch path, chosen explicitly (no fallback warning)
    mesh = init_device_mesh("cpu", (WORLD,))
    failures = []
    for family in FAMILIES:
        torch.manual_seed(0)
        orig = testing.build(family).train()
        ref = _reference(orig, family)
        for config in CONFIGS:
            for patched in (False, True):
                _run_config(rank, family, orig, config, patched, ref, mesh, failures)
    _dcp_round_trip(rank, testing.build("internvl").train(), mesh, tmpdir, failures)
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_data_parallel_fsdp2_checkpointing_and_dcp(tmp_path):
    """DDP, FSDP2 (bf16 mixed precision, reshard on/off), activation checkpointing and a DCP round trip."""
    spawn(_data_parallel_worker, str(tmp_path / "dcp"))


# ------------------------------------------------------------------------------------------------ ZeRO-3


def _zero3_partitioned(module):
    """Mark ``module``'s parameters the way deepspeed.zero.Init leaves them (no deepspeed needed)."""
    for i, p in enumerate(module.parameters()):
        p.ds_id, p.ds_status = i, "NOT_AVAILABLE"
    return module


def test_zero3_partitioned_parameters_are_not_fused():
    model = Holder(_zero3_partitioned(testing.build("llava")))
    report = fastvlm.patch(model)
    assert not report.patched, str(report)
    (entry,) = report.not_swapped
    assert entry.path == "proj" and "DeepSpeed ZeRO-3" in entry.detail and "linear_1.weight" in entry.detail
    assert type(model.proj).__name__ == "LlavaMultiModalProjector"


def test_zero3_class_level_falls_back_with_the_reason(monkeypatch):
    """A fused class constructed under zero.Init (apply_to_transformers) runs the original forward, saying why."""
    orig = testing.build("llava")
    fused = _zero3_partitioned(fastvlm.nn.from_module(copy.deepcopy(orig)))
    x = testing.input_for("llava", orig)
    with fastvlm.trace() as t:
        y = fused(x)
    assert torch.equal(y, orig(x))
    assert any("DeepSpeed ZeRO-3" in r for rec in t.records for r in rec.reasons), str(t)
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    fastvlm._dispatch.reset_warnings()
    with pytest.raises(fastvlm.FastVLMFallbackError, match="ZeRO-3"):
        fused(x)
