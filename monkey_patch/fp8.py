"""FP8 training (torchao float8) for selected linear layers: not available in this release yet.

`--use_fp8` is rejected up front by `monkey_patch.preflight`, so no run silently trains without it.
"""
