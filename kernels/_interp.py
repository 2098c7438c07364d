"""Helpers that keep one kernel source correct under the Triton interpreter and on the GPU.

* ``dot_operand``: the interpreter stores bf16 as raw uint16 and multiplies the bit patterns in ``tl.dot``
  (triton#11584). Under the interpreter the operand is upcast to fp32; on the GPU the branch is compiled away and the
  bf16/fp16 operand goes to the tensor cores unchanged.
* ``autotune_configs``: the interpreter cannot benchmark, so it keeps only the first config. The other configs are
  covered by explicit block-size tests and by the sm_90 compile audit.
"""
import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET = tl.constexpr(INTERPRETING)


@triton.jit
def dot_operand(x):
    if INTERPRET:
        x = x.to(tl.float32)
    return x


def autotune_configs(configs):
    return configs[:1] if INTERPRETING else configs
