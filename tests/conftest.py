import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. This must be set
# before triton (and vgs_kernels, which imports it) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
