import os

import torch

# Without CUDA, Triton kernels can only run under its interpreter, which triton.jit picks when a kernel is
# defined: the variable has to be set before any test module imports fastcls.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
