#!/usr/bin/env bash
# Everything a short lease of a GPU machine is for, in one time-boxed script:
#
#   bash bench/gpu_session.sh          (results under $OUT, default ./gpu-out)
#
# 1. the GPU tests: goldens, precisions, streams, CUDA graphs (tests/test_gpu.py), channels-last
#    layouts, and the conv kernel sweeps against PyTorch (test files that use the GPU when there is one);
# 2. conv1's space-to-depth variant (bench/conv_sweep.py --layers conv1) and the fc / LRN tiles
#    (bench/step_sweep.py); issue 13's two levers: the tf32x3 and space-to-depth tests on the GPU (their
#    errors into errors.tsv), then AlexNet with and without conv1's space-to-depth, and in fp32 exact
#    against tf32x3 (levers.tsv); a per-step profile of AlexNet in both layouts;
# 3. bench/alexnet_gpu.py: netdsl (channels-last, CUDA graph, all-NCHW) and PyTorch eager at batch
#    128 and 1 in every precision, then torch.compile in bf16 for as long as the time box allows;
# 4. bench/train.py --gpu: a training step of AlexNet at batch 128 in bf16 against eager and torch.compile.
# Meanwhile, background processes compile the kernels the benchmark needs (filling the caches on disk).
# Works with the machine's own torch and triton; lark travels as a wheel in .whl/ when missing.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NETDSL_GPU_REPORT=$OUT/errors.tsv TRITON_DEFAULT_FP_FUSION=1
if ! python3 -c "import lark" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
# the source tree as the installed package lays it out (netdsl.codegen, .grammars, .nets)
for part in codegen grammars nets; do [ -e "netdsl/$part" ] || ln -s "../$part" "netdsl/$part"; done
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, lark; print('torch', torch.__version__, 'triton', triton.__version__, \
'lark', lark.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# background: compile netdsl's kernels (and Inductor's) for the benchmark while the tests run
(timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,1 \
    --systems netdsl,netdsl-nchw >"$OUT/warm_netdsl.log" 2>&1 &)
(timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,1 --precisions bf16 \
    --systems compile >"$OUT/warm_compile.log" 2>&1 &)
(timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,1 --precisions bf16,tf32x3,fp32 \
    --systems netdsl-graph,netdsl-s2d-graph >"$OUT/warm_levers.log" 2>&1 &)

workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
timeout "${TEST_S:-150}" python3 -m pytest -q $workers -p no:cacheprovider -rfE \
    tests/test_gpu.py tests/test_layout.py tests/test_kernel_conv_nhwc.py tests/test_kernel_configs.py \
    tests/test_emitted.py tests/test_fusion_legality.py tests/test_kernel_conv.py tests/test_train_module.py \
    2>&1 | tee "$OUT/pytest.log" | tail -n 30
echo "--- measured errors (relative to the largest |reference|)"
sort "$OUT/errors.tsv" 2>/dev/null | tail -n 30

# conv1 as a space-to-depth conv on conv_nhwc (the next step to decide), and the fc / LRN tiles
timeout "${SWEEP_S:-60}" python3 bench/conv_sweep.py --batch 128 --dtypes bf16 --layers conv1 >"$OUT/conv1.log" 2>&1
grep -P "^conv1\t" "$OUT/conv1.log"

# issue 13: tf32x3 against float64 and space-to-depth against F.conv2d on the GPU (errors into errors.tsv), then
# the decisions: AlexNet with conv1 on conv.py vs lowered by space-to-depth, fp32 exact vs tf32x3, and the convs
timeout "${LEVER_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider -rfE tests/test_kernel_tf32x3.py \
    tests/test_precision.py tests/test_space_to_depth.py 2>&1 | tee "$OUT/pytest_levers.log" | tail -n 5
grep "^tf32x3" "$OUT/errors.tsv" 2>/dev/null | sort | tail -n 20
timeout "${LEVERS_S:-150}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 --precisions bf16,tf32x3,fp32 \
    --systems netdsl-graph,netdsl-s2d-graph --tsv "$OUT/levers.tsv" >"$OUT/levers.log" 2>&1
cat "$OUT/levers.tsv" 2>/dev/null
timeout "${SWEEP_S:-60}" python3 bench/conv_sweep.py --batch 128 --dtypes tf32x3,tf32 --layers conv1,conv2,conv4 \
    --configs 1,2,4 >"$OUT/conv_tf32x3.log" 2>&1
grep -P "^conv\d\t" "$OUT/conv_tf32x3.log"
timeout "${SWEEP_S:-60}" python3 bench/step_sweep.py --batches 128,1 >"$OUT/step_sweep.log" 2>&1

# where the time goes: every step of AlexNet at batch 128 in bf16, channels-last and all-NCHW
for layout in auto nchw; do
    timeout "${PROFILE_S:-40}" python3 -m netdsl run --random 128 --batch 128 --dtype bf16 --layout $layout \
        --time --top 1 >"$OUT/profile_$layout.log" 2>&1
done
grep -v "^input " "$OUT/profile_auto.log" | head -n 60

timeout "${BENCH_S:-200}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 \
    --systems netdsl,netdsl-graph,netdsl-nchw,eager --tsv "$OUT/bench.tsv" >"$OUT/bench.log" 2>&1
tail -n 5 "$OUT/bench.log"
timeout "${COMPILE_S:-45}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 --precisions bf16 \
    --systems compile --tsv "$OUT/bench.tsv" >"$OUT/bench_compile.log" 2>&1
tail -n 3 "$OUT/bench_compile.log"
tail -n 3 "$OUT"/warm_*.log
echo "--- bench rows: batch, precision, system, latency ms, images/s, x floor, warm-up s"
cat "$OUT/bench.tsv" 2>/dev/null

# training: a step of AlexNet at batch 128 in bf16, netdsl (GraphModule) vs eager vs torch.compile, and two
# towers on two GPUs when there are two (tests/test_train_module.py's CPU-and-GPU tower tests run above)
timeout "${TRAIN_S:-120}" python3 bench/train.py --nets lenet5 --gpu --steps 10 >"$OUT/train.log" 2>&1
tail -n 8 "$OUT/train.log"

# training on the GPU (issue 12, bench/train_gpu.py): a step of AlexNet at batch 128 and 32 in bf16 and tf32 on
# netdsl's kernels, netdsl's torch backend, eager and torch.compile (each system in a time box of TRAIN_BOX_S), then
# each conv's and fc's backward, netdsl's against cuDNN / cuBLAS. Rows stream to the log as measured; each finished
# (batch, dtype) block is appended to the TSV and rewrites the choice table, so a cut-off run keeps those. The
# table goes to $OUT, never over the shipped netdsl/compiler/backward_choices.json (copy it there once checked).
timeout "${TRAIN_GPU_S:-300}" python3 bench/train_gpu.py --batches 128,32 --dtypes bf16,tf32 --box "${TRAIN_BOX_S:-60}" \
    --tsv "$OUT/train_gpu.tsv" --write-choices --choices-file "$OUT/backward_choices.json" >"$OUT/train_gpu.log" 2>&1
tail -n 40 "$OUT/train_gpu.log"
