#!/usr/bin/env bash
# The GPU run (bench/gpu.py): capture vs the bare forward and the training step, at the anchor sizes,
# on one H100/H200 in about 3-5 minutes. Installs nothing; writes $OUT/gpu.json (or --out FILE).
# --vllm-teacher FOLDER adds potstill's vLLM capture against plain vLLM (where vllm is installed).
#
#   bench/gpu.sh --prep [PYTHON]   once, on a machine with the internet: the packages the GPU image
#                                  lacks (zarr and its dependencies), as files in bench/_gpu_deps,
#                                  built for the GPU machine's Python (default 3.12); carry that folder
#   bench/gpu.sh [FLAGS]           on the GPU machine; FLAGS go to bench/gpu.py (--help)
#   bench/gpu.sh --verify [FLAGS]  on the GPU machine's CPU cores: `store verify` against hashing
#                                  (bench/verify_speed.py, FLAGS go there), about 3 minutes; writes
#                                  $OUT/verify.json (or --json FILE)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prep" ]]; then
    python_version="${2:-3.12}"
    # The versions potstill is tested with; no dependencies resolved (numpy, packaging and
    # typing-extensions are in the GPU image). Binary wheels only: nothing is built.
    python3 -m pip install --target bench/_gpu_deps --no-deps --only-binary=:all: \
        --python-version "$python_version" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --upgrade \
        zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    exit 0
fi

if [[ "${1:-}" == "--verify" ]]; then
    shift
    # verify checks at most 8 shards at once (store.verify.MAX_JOBS): 8,192 records in the writer's
    # 1,024-record shards give the 512-token stores 8 of them
    exec python3 bench/verify_speed.py --records 8192 --json "${OUT:-.}/verify.json" "$@"
fi

exec python3 bench/gpu.py "$@"
