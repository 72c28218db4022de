"""The runtime: compiled layers, the kernel cache, the interpreter fallback.

On a machine without a CUDA GPU the generated kernels run in Triton's
interpreter. Triton reads TRITON_INTERPRET when it is imported, so this package
sets it before anything here imports Triton.
"""
import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
