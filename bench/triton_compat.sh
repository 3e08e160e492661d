#!/usr/bin/env bash
# The kernels against the Triton and PyTorch of the GPU machines (Triton 3.6, PyTorch 2.11 on the H200s), on any
# machine with the package registry, no GPU needed:
#
#   bash bench/triton_compat.sh            (TRITON=3.6.0 TORCH=2.11.0 VENV=.venv-triton36 by default)
#   bash bench/triton_compat.sh --help     (this text; any other argument is refused with exit status 2)
#
# The main environment has the newest Triton, whose sm_90 builds are checked by the test suite. Which tiles build
# without spilling depends on the version (Triton 3.6 stages operands differently and assembles with ptxas 12.8,
# 3.9 with 13.x), so a tile that is clean on one may spill on the other. This builds a second environment with the
# older pair (a few GB: PyTorch's CUDA wheel and its libraries), then
#   1. runs the sm_90 build tests (every kernel family at AlexNet's shapes, forward and backward, in each dtype)
#      and the tests that run the torch backend and the ONNX importer (PyTorch API differences);
#   2. compiles every net of nets/ with --train at batch 1 and 128 in fp32, tf32 and bf16, and AlexNet with each
#      lever, and lists every kernel that spills (none, when all is well).
# Its tests do not run Triton's interpreter: 3.6's lacks bf16 constants and fails with NumPy 2.4 (the CPU test
# suite needs Triton 3.9). Exit status 1 when a test fails or a kernel spills.
set -u
usage() {  # the comment above, which says what this does and how to run it
    sed -n '2,/^set -u$/{/^set -u$/d; s/^# \{0,1\}//; p}' "$0"
}
case "$*" in
    "") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/triton_compat.sh: unknown argument: $* (it takes none; settings are variables: TRITON, TORCH," \
            "VENV, OUT, PYTHON)" >&2
       echo "usage: bash bench/triton_compat.sh [--help]" >&2
       exit 2 ;;
esac
cd "$(dirname "$0")/.."
TRITON=${TRITON:-3.6.0}
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-.venv-triton36}
OUT=${OUT:-build/triton-compat}
python=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$python" -m venv "$VENV" || exit 1
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install "torch==$TORCH" "triton==$TRITON" "numpy<2.4" \
        || exit 1
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install -e '.[test,onnx]' || exit 1
fi
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT"
export NETDSL_CACHE_DIR=$OUT/cache
status=0

"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rf tests/test_sm90_*.py tests/test_kernel_conv_lrn_pool.py \
    tests/test_onnx_import.py tests/test_golden.py tests/test_runtime.py >"$OUT/pytest.log" 2>&1 || status=1
tail -n 15 "$OUT/pytest.log"

build() {  # build NAME NETDSL-COMPILE-ARGUMENTS...: compile, then print its kernels that spill
    local name=$1
    shift
    if ! "$VENV/bin/python" -m netdsl compile "$@" -o "$OUT/$name" >"$OUT/$name.log" 2>&1; then
        echo "$name: compile failed (see $OUT/$name.log)"
        status=1
        return
    fi
    local spilled
    spilled=$(grep -h "kernels that spill" "$OUT/$name/report.txt" "$OUT/$name/train/report.txt" 2>/dev/null \
        | grep -v ": none$" | sed 's/kernels that spill: //' | tr '\n' ' ')
    if [ -n "$spilled" ]; then
        echo "$name: kernels that spill: $spilled"
        status=1
    fi
}
for net in lenet5 simplenet alexnet; do
    for dtype in fp32 tf32 bf16; do
        for batch in 1 128; do
            build "$net-$dtype-$batch" "nets/$net.net" --dtype "$dtype" --batch "$batch" --train
        done
    done
done
build alexnet-fp16-128 nets/alexnet.net --dtype fp16 --batch 128
build alexnet-merged-bf16-128 nets/alexnet.net --dtype bf16 --batch 128 --merge-towers
build alexnet-merged-fp32-32 nets/alexnet.net --dtype fp32 --batch 32 --merge-towers
build alexnet-split-bf16-32 nets/alexnet.net --dtype bf16 --batch 32 --split-k --merge-towers
build alexnet-s2d-fp32-128 nets/alexnet.net --dtype fp32 --batch 128 --space-to-depth
build alexnet-tf32x3-128 nets/alexnet.net --dtype fp32 --precision tf32x3 --batch 128
build alexnet-nchw-bf16-1 nets/alexnet.net --dtype bf16 --batch 1 --layout nchw
build vgg16-bf16-128 nets/vgg16.net --dtype bf16 --batch 128
build vgg16-fp32-1 nets/vgg16.net --dtype fp32 --batch 1
[ "$status" -eq 0 ] && echo "every build is free of spills under triton $TRITON" || echo "FAILED (above)"
exit "$status"
