"""fastvlm: fused kernels for the vision-to-LLM path of vision-language models.

    import fastvlm
    fused = fastvlm.nn.from_module(model.model.multi_modal_projector)   # shares the original's parameters
    with fastvlm.trace() as t:
        out = fused(features)
    print(t)                                                             # which backend ran, and why

Backends: Triton kernels on CUDA tensors; a plain-PyTorch path elsewhere (see README, "How backends are chosen").
"""
__version__ = "0.1.0"

from fastvlm import nn  # noqa: E402
from fastvlm._dispatch import FastVLMFallbackError, FastVLMFallbackWarning, trace  # noqa: E402
from fastvlm.integrations.attention import register_attention  # noqa: E402
from fastvlm.integrations.transformers import (  # noqa: E402
    PatchReport,
    apply_to_transformers,
    patch,
    revert_transformers,
    unpatch,
)
from fastvlm.ops.attention import attention  # noqa: E402
from fastvlm.ops.feature_map import feature_map_projector  # noqa: E402
from fastvlm.ops.linear_norm import linear_residual_layernorm  # noqa: E402
from fastvlm.ops.projector import mlp_projector  # noqa: E402
from fastvlm.ops.scatter import scatter_image_features  # noqa: E402

__all__ = ["nn", "trace", "mlp_projector", "feature_map_projector", "linear_residual_layernorm",
           "scatter_image_features", "attention", "register_attention", "patch", "unpatch", "PatchReport",
           "apply_to_transformers", "revert_transformers", "FastVLMFallbackError", "FastVLMFallbackWarning",
           "__version__"]
