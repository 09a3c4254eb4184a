"""Test session setup.

Without CUDA the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when a
kernel is defined (at ``@triton.jit``), so it is set here, before any test module imports a
kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
