"""The GEMM pruners (kernels/gemm_configs.py, kernels/linear_norm.py) keep only configs whose pipeline buffers fit
the launch device's shared memory: stages x (A tile + weight tile(s)) x the element size, so fp32 takes twice what
bf16 takes. No GPU here: the device's limit is faked (the values Triton reports for each GPU)."""
import pytest
import torch

from fastvlm.kernels import gemm_configs as G
from fastvlm.kernels import linear_norm as LN

H100, A100, SM89 = 232448, 166912, 101376  # max_shared_mem per block (bytes)


class _Tensor:
    def __init__(self, dtype, device):
        self.dtype, self.device_index = dtype, device

    def get_device(self):
        return self.device_index

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.fixture
def device_limit(monkeypatch):
    limits = {}
    monkeypatch.setattr(G, "_device_limit", lambda idx: limits[idx])
    monkeypatch.setattr(G, "_DEVICE_SMEM", {})
    return limits


def _kept(dtype, device, gated=False):
    configs = G._prune_configs(G._triton_configs(), {"a_ptr": _Tensor(dtype, device), "GATED": gated})
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in configs]


def _smem(cfg, dtype, gated=False):
    bm, bn, bk, _, stages = cfg
    return G._smem_estimate(bm, bn, bk, stages, torch.empty((), dtype=dtype).element_size(), gated)


def test_fp32_tiles_are_pruned_by_the_devices_shared_memory(device_limit):
    device_limit.update({0: H100, 1: A100, 2: SM89})
    # fp32 runs its own rows (BLOCK_K 32: the audited tf32x3 tiles without spills), 16-bit never runs them
    h100 = _kept(torch.float32, 0)
    assert h100 == [c for c in G.FP32_GEMM_CONFIGS if _smem(c, torch.float32) <= G.SMEM_BUDGET]
    assert not set(h100) & set(G.GEMM_CONFIGS)
    assert not set(_kept(torch.bfloat16, 0)) & set(G.FP32_GEMM_CONFIGS)
    # A100 (163 KB): bf16 keeps 128x128x64 at 3 stages (96 KB); SM89 (99 KB) drops fp32 128x64x32 at 4 stages (128 KB)
    assert (128, 128, 64, 8, 3) in _kept(torch.bfloat16, 1)
    assert (128, 64, 32, 8, 4) in h100 and (128, 64, 32, 8, 4) not in _kept(torch.float32, 2)
    for dev, limit in ((0, H100), (1, A100), (2, SM89)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for gated in (False, True):
                kept = _kept(dtype, dev, gated)
                assert kept, (dev, dtype, gated)
                assert all(_smem(c, dtype, gated) <= limit - (H100 - G.SMEM_BUDGET) for c in kept), (dev, dtype, kept)
                assert all((c[2] == G.FP32_BLOCK_K) == (dtype == torch.float32) for c in kept), (dtype, kept)


def test_no_config_fits_takes_fewer_stages(device_limit):
    device_limit[0] = 40 * 1024  # a small budget: no gated config fits with its stages
    for dtype, rows in ((torch.float32, G.FP32_GEMM_CONFIGS), (torch.bfloat16, G.GEMM_CONFIGS)):
        (cfg,) = _kept(dtype, 0, gated=True)
        assert cfg[:4] == rows[-1][:4] and cfg[4] < rows[-1][4]  # the dtype's own smallest row
        assert _smem(cfg, dtype, gated=True) <= max(40 * 1024 - (H100 - G.SMEM_BUDGET), _smem(cfg[:4] + (1,), dtype,
                                                                                             gated=True))


def test_cpu_tensors_use_the_audited_budget(device_limit):
    """The interpreter and the host-only sm_90 driver (CPU tensors): the H100 budget, no device query."""
    assert _kept(torch.float32, -1) == [c for c in G.FP32_GEMM_CONFIGS if _smem(c, torch.float32) <= G.SMEM_BUDGET]
    assert _kept(torch.bfloat16, -1) == [c for c in G.GEMM_CONFIGS if _smem(c, torch.bfloat16) <= G.SMEM_BUDGET]


def test_traced_rule_config_takes_the_dtypes_rows():
    """A launch traced by torch.compile takes the first config the GEMM's own pruner keeps: the dtype's first row."""
    from types import SimpleNamespace

    from fastvlm.kernels import _traced

    # the GEMM autotuner's full list and pruner (the interpreter's tuner keeps only the first config)
    tuner = SimpleNamespace(configs=G._triton_configs(), early_config_prune=G._prune_configs)
    for dtype, rows in ((torch.float32, G.FP32_GEMM_CONFIGS), (torch.bfloat16, G.GEMM_CONFIGS)):
        kw = _traced.rule_config(tuner, ["a_ptr", "GATED"], [_Tensor(dtype, -1), False], {})
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]) == rows[0]


def test_linear_norm_pruner_follows_the_device(device_limit):
    device_limit.update({0: H100, 1: SM89})

    def kept(dev, dtype):
        cs = LN._prune_configs(LN._triton_configs(), {"a_ptr": _Tensor(dtype, dev)})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in cs]

    assert (64, 256, 64, 3) in kept(0, torch.bfloat16)  # 120 KB
    small = kept(1, torch.bfloat16)
    assert (64, 256, 64, 3) not in small and small
    assert all((bm + bn) * bk * 2 * s <= SM89 - (H100 - G.SMEM_BUDGET) for bm, bn, bk, s in small)
