"""Probe inputs for the pairings' verification: random forward arguments shaped as each family's caller passes them,
every size read off the module. The builder lives in fastvlm/integrations/verify.py, which imports only torch, so
fastvlm/nn can use it without importing fastvlm.integrations.transformers (no import circle)."""
from __future__ import annotations


def probe_args(recipe, fused):
    """Random forward arguments for ``fused``; raises ``ProbeUnavailable`` saying why they cannot be built."""
    from fastvlm.integrations.verify import build_probe

    return build_probe(recipe, fused)
