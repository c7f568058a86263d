"""Import first: without a GPU, Triton can only interpret its kernels, and it reads ``TRITON_INTERPRET`` once, when
it is itself imported (transformers' trainer utilities import it through torch._dynamo). Setting it any later
leaves Triton's own helpers compiled and our kernels interpreted, which fails inside the first kernel."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
