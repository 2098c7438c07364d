"""Activations chosen by a constexpr name, evaluated in fp32 (portable math only: erf, sigmoid). NaN and +-Inf map as
the PyTorch ops map them (relu keeps NaN; checked value by value in tests/test_nonfinite.py)."""
import triton
import triton.language as tl

# Names understood by ``apply_act``; fastvlm.reference.activations holds the PyTorch twins.
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "silu", "relu")


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    if ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) == 2 * sigmoid(2u)
    elif ACT == "quick_gelu":
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "relu":
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch's
    else:
        y = x
    return y
