#!/usr/bin/env bash
# Stage SonicMoE for benchmarks/moe_block.py's `sonic_moe` implementation on the lent GPU machine, which has no
# network and takes at most 64 MiB of files per call. SonicMoE (sonic-moe 0.1.2.post1 on quack-kernels 0.4.1 and
# nvidia-cutlass-dsl 4.4.2, the versions that import together beside torch 2.11) needs the DSL's compiler, a 74 MB
# wheel, so its wheels travel in two halves, .sonic_a and .sonic_b (git-ignored), in two calls back to back on the
# same machine (files under /tmp stay while it is held).
#   bash benchmarks/sonic_moe/stage.sh            here, with a package registry: download, split, print the calls
#   bash benchmarks/sonic_moe/stage.sh install    on the GPU machine, in each of the two calls
set -euo pipefail
cd "$(dirname "$0")/../.."
pins=(nvidia-cutlass-dsl==4.4.2 nvidia-cutlass-dsl-libs-base==4.4.2 quack-kernels==0.4.1 sonic-moe==0.1.2.post1
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 cuda-bindings==13.0.3 cuda-pathfinder==1.9.1
      einops==0.8.2)
stash=/tmp/sonic
site_path='$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages'  # the DSL's .pth, which --target skips
# quack autotunes each GEMM kind at its first call (about a minute each); these keep the compiled kernels and the
# chosen configs under /tmp, so later calls on the same held machine skip it.
tuning_cache='QUACK_CACHE_DIR=/tmp/qcache QUACK_CACHE_AUTOTUNING=1'

if [ "${1:-download}" = install ]; then
    mkdir -p "$stash"
    for half in .sonic_a .sonic_b; do if [ -d "$half" ]; then cp "$half"/* "$stash"/; fi; done
    shopt -s nullglob
    parts=("$stash"/*.part-*)
    if [ ${#parts[@]} -lt 2 ]; then
        echo "stage.sh install: ${#parts[@]} of 2 halves of SonicMoE's wheels in $stash; carry .sonic_a, then .sonic_b"
        [ ! -d .sonic_b ]  # the second call without the first half (the machine was released): fail
        exit
    fi
    cat "${parts[@]}" > "$stash/$(basename "${parts[0]%.part-*}")"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$stash"/*.whl
    echo "SonicMoE installed in /tmp/site; run with PYTHONPATH=$site_path $tuning_cache"
    exit 0
fi

downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$downloads" "${pins[@]}" \
    2> "$downloads/pip.log" || { cat "$downloads/pip.log" >&2; exit 1; }
rm -rf .sonic_a .sonic_b && mkdir -p .sonic_a .sonic_b .git/info
compiler=$(ls "$downloads"/nvidia_cutlass_dsl_libs_base-*.whl)
split -n 2 "$compiler" ".sonic_a/$(basename "$compiler").part-"
mv .sonic_a/*.part-ab .sonic_b/ && rm "$compiler" && mv "$downloads"/*.whl .sonic_b/
for half in /.sonic_a/ /.sonic_b/; do grep -qx "$half" .git/info/exclude 2>/dev/null || echo "$half" >> .git/info/exclude; done
echo "staged .sonic_a ($(du -sh .sonic_a | cut -f1)) and .sonic_b ($(du -sh .sonic_b | cut -f1)). Two calls, back to back:"
echo '  1. carry [".whl", ".sonic_a"]: <the .whl install line>; bash benchmarks/sonic_moe/stage.sh install'
echo "  2. carry [\".sonic_b\"]: bash benchmarks/sonic_moe/stage.sh install && export PYTHONPATH=$site_path $tuning_cache; python3 benchmarks/moe_block.py --implementations grouped_mm_compiled,scattermoe,sonic_moe ..."
