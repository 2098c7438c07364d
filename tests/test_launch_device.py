"""Launches follow the arguments' CUDA device, not Triton's current one (kernels/_launch.py): Triton compiles,
autotunes and launches on the current device, so a tensor on cuda:1 while cuda:0 is current would be read by a kernel
on the wrong device. The launch path makes the tensor's device current only when it differs. No GPU here: a fake
driver, fake tensors and a fake ``torch.cuda.device`` record which device is current at each launch."""
import contextlib

import pytest
import torch

from fastvlm.kernels import _launch


class _Driver:
    def __init__(self):
        self.current = 0

    def get_current_device(self):
        return self.current

    def get_current_stream(self, device=None):
        return 100 + device


class _Tensor:
    """What the launch path reads of a tensor: its device index, data pointer and dtype."""

    def __init__(self, device):
        self.device_index = device
        self.dtype = torch.float16

    def get_device(self):
        return self.device_index

    def data_ptr(self):
        return 4096


class _Kernel:
    def __init__(self, drv, log):
        self.drv, self.log, self.function, self.packed_metadata = drv, log, object(), object()

    def run(self, *args):
        self.log.append(("launch", self.drv.current, args[3]))  # (current device, stream)


class _Fn:
    arg_names = ("x_ptr", "n", "BLOCK")
    __name__ = "fake_kernel"

    def __init__(self, drv, log):
        self.drv, self.log = drv, log

    def run(self, *args, grid, warmup, **consts):  # the first launch of a specialisation (compiles)
        self.log.append(("compile", self.drv.current))
        return _Kernel(self.drv, self.log)


@pytest.fixture
def fake(monkeypatch):
    drv, log = _Driver(), []
    monkeypatch.setattr(_launch, "INTERPRETING", False)
    monkeypatch.setattr(_launch, "_SPECIAL", False)  # (interpreter-or-traced: the launchers read this one flag)
    monkeypatch.setattr(_launch, "_DRIVER", type("D", (), {"active": drv})())
    monkeypatch.setattr(_launch, "_hooks_active", lambda: False)

    @contextlib.contextmanager
    def device(idx):  # torch.cuda.device, for the fake driver
        log.append(("guard", idx))
        before, drv.current = drv.current, idx
        try:
            yield
        finally:
            drv.current = before

    monkeypatch.setattr(torch.cuda, "device", device)
    return drv, log


@pytest.mark.parametrize("where", ["call", "plan"])
def test_launch_on_the_tensors_device(where, fake):
    drv, log = fake
    plan = _launch.Plan(_Fn(drv, log), {"BLOCK": 16}, 2, n_ptr=1)
    call = _launch.Call(plan, (4,), (7,))

    def launch(t):
        if where == "call":
            call.launch((t,))
        else:
            plan.launch((4, 1, 1), (t, 7))

    for _ in range(2):  # the first launch compiles, the second takes the cached kernel
        launch(_Tensor(1))
    assert log == [("guard", 1), ("compile", 1), ("guard", 1), ("launch", 1, 101)]
    assert drv.current == 0  # restored
    log.clear()
    launch(_Tensor(0))
    launch(_Tensor(0))
    assert log == [("compile", 0), ("launch", 0, 100)]  # the current device: no guard
    log.clear()
    launch(_Tensor(-1))  # a CPU tensor (the host-only benchmark driver): no guard
    assert ("guard", -1) not in log and all(e[0] != "guard" for e in log)


def test_autotuning_runs_on_the_tensors_device(fake):
    drv, log = fake

    class Tuner:
        best_config = type("C", (), {"all_kwargs": lambda self: {"BLOCK": 32}})()

        def __getitem__(self, grid):
            return lambda *args, **kw: log.append(("tune", drv.current))

    assert _launch.autotuned_config(Tuner(), (1,), (_Tensor(2), 7), {}) == {"BLOCK": 32}
    assert _launch.autotuned_config(Tuner(), (1,), (_Tensor(0), 7), {}) == {"BLOCK": 32}
    assert log == [("guard", 2), ("tune", 2), ("tune", 0)]
