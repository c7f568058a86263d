"""Import first: Triton reads these settings from the environment, some of them only when it is itself imported
(transformers' trainer utilities import it through torch._dynamo).

- Without a GPU, Triton can only interpret its kernels, and it reads ``TRITON_INTERPRET`` once, at import. Setting it
  any later leaves Triton's own helpers compiled and our kernels interpreted, which fails inside the first kernel.
- On a GPU, the ScatterMoE kernels' autotuning results are kept in Triton's cache (``TRITON_CACHE_DIR``), keyed by
  the kernel source, the GPU architecture and the shapes: the first step of a full-depth Qwen3-30B-A3B LoRA run
  took 77-104 s on an H200 while autotuning, 2-5 s when a run before it had tuned the same shapes
  (docs/history.md). ``TRITON_CACHE_AUTOTUNING=0`` tunes afresh every time.
"""

import os

import torch

if torch.cuda.is_available():
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
