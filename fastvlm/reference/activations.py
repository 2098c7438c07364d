"""PyTorch twins of kernels/activations.py, plus their derivatives and the mapping from module objects to names."""
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "silu", "relu")


def act_ref(x, act):
    """Apply activation ``act`` the way the transformers/torch module does (same op, same dtype behaviour)."""
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    if act == "none":
        return x
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def act_grad_ref(h, grad, act):
    """d act(h) / dh * grad, computed in fp32 (fp64 for fp64 inputs) and returned in grad's dtype."""
    ct = torch.promote_types(h.dtype, torch.float32)
    x = h.to(ct)
    g = grad.to(ct)
    if act == "none":
        return grad
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        d = cdf + x * torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    elif act == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        u = k * (x + 0.044715 * x ** 3)
        t = torch.tanh(u)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)
    elif act == "quick_gelu":  # in autograd's order: x * (1 - s) * s stays finite where 1.702 * x overflows
        s = torch.sigmoid(1.702 * x)
        d = s + x * (1.0 - s) * s * 1.702
    elif act == "silu":
        s = torch.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif act == "relu":  # torch's threshold_backward: the gradient passes unless x <= 0 (so it passes at NaN)
        d = (~(x <= 0)).to(x.dtype)
    else:
        raise ValueError(f"unknown activation {act!r}")
    return (g * d).to(grad.dtype)


def activation_name(module):
    """Name of the fused activation equivalent to an activation *module*, or None when there is none.

    Matching is by class name so that transformers need not be imported; each entry was checked against the
    transformers 5.x source (activations.py) and torch.nn.
    """
    import torch.nn as nn

    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.ReLU) and not module.inplace:
        return "relu"
    if isinstance(module, nn.Identity):
        return "none"
    name = type(module).__name__
    return {
        "GELUActivation": "gelu",  # F.gelu, or its erf formula when use_gelu_python
        "GELUTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "NewGELUActivation": "gelu_tanh",
        "QuickGELUActivation": "quick_gelu",
        "SiLUActivation": "silu",
        "LinearActivation": "none",
    }.get(name) or BY_BEHAVIOUR.get(type(module))


# activation classes whose behaviour was compared with act_ref on a probe (fastvlm/integrations/structure.py)
BY_BEHAVIOUR: dict = {}
