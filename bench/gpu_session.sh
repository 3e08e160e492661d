#!/usr/bin/env bash
# Everything a short lease of a GPU machine is for, in one script that fits one command of the device tool:
#
#   BUDGET_S=540 bash bench/gpu_session.sh [all|tests|train|infer]     (results under $OUT, default ./gpu-out)
#
# Every stage runs in a time box, and all of them together within BUDGET_S seconds (default 540: a command
# may run 600 s at most): when the budget is spent the remaining stages are skipped and say so. The stages,
# most important first:
# tests  the GPU tests: goldens, precisions, streams, CUDA graphs (tests/test_gpu.py), channels-last layouts,
#        the conv kernel sweeps, the training module, the kernels' training step and the training kernels
#        (cross-entropy with class indices or weights, dropout, batch norm, SGD) (test files that use the
#        GPU when there is one), then issue 13's levers (tf32x3 against float64, space-to-depth against
#        F.conv2d, merged towers and split-K convs against the golden; their errors into errors.tsv; the tuner
#        with its real clock);
# train  bench/train_gpu.py (issue 12): AlexNet's training step at batch 128 then 32, bf16 then tf32, on
#        netdsl's kernels, netdsl's torch backend, eager and torch.compile, and each conv's and fc's backward
#        against cuDNN / cuBLAS (the choice table to $OUT); bench/train.py --gpu; bench/train_memory.py --gpu;
# infer  issue 13's table (bf16 at batch 128, 32, 1, tf32 and fp32 at 128: netdsl against eager, torch.compile
#        and max-autotune), then its decisions (conv1's space-to-depth, fp32 exact against tf32x3, the towers
#        as two streams or merged into grouped launches, split-K convs at batch 1 and 32), `netdsl tune` at batch
#        128 and 1 in bf16 and at 128 in tf32 and AlexNet with its tiles, the streams' rows,
#        VGG-16, the conv and step sweeps, a per-step profile of AlexNet (both layouts, and merged).
# `all` (the default) runs the three in that order. Meanwhile, background processes compile the kernels the
# benchmarks need (filling the caches on disk). Works with the machine's own torch and triton; the GPU
# machines have no lark and no registry, so lark travels as a wheel in .whl/ (untracked, so it goes with the
# working tree): before the device command, on this machine, `python -m pip download --no-deps -d .whl lark`.
# Exit status: 2 for an unknown part, 3 when lark is missing, 4 on a machine without a GPU (env.txt written, nothing
# tested or timed: the benchmarks themselves exit 4 there too); else 0, each stage's outcome in its log under $OUT.
set -u
PART=${1:-all}
case "$PART" in all|tests|train|infer) ;; *) echo "usage: bash bench/gpu_session.sh [all|tests|train|infer]" >&2; exit 2;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
# box SECONDS COMMAND...: the command in a time box of SECONDS, or of what is left of the budget if less
box() {
    local want=$1 left
    shift
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -le 5 ]; then
        echo "--- skipped, the budget of ${BUDGET_S} s is spent: $*" | cut -c1-160
        return 124
    fi
    timeout "$(( want < left ? want : left ))" "$@"
}
wants() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
export PYTHONUNBUFFERED=1 NETDSL_GPU_REPORT=$OUT/errors.tsv TRITON_DEFAULT_FP_FUSION=1
if ! python3 -c "import lark" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
if ! PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} python3 -c "import lark" 2>/dev/null; then
    # a lease is minutes long: fail at once rather than in every stage
    echo "gpu_session.sh: this machine has no lark and .whl/ holds no wheel of it" >&2
    echo "hint: on the machine you launch from, run: python -m pip download --no-deps -d .whl lark" >&2
    exit 3
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
# without a GPU every stage would only say so: stop here, once, where the device command's output shows it
if ! gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null); then
    echo "gpu_session.sh: no CUDA GPU here: nothing tested or timed (the machine is in $OUT/env.txt)" >&2
    exit 4
fi

# background: compile netdsl's kernels (and Inductor's) for the benchmarks while the tests run
if wants infer; then
    (timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,1 --precisions bf16 \
        --systems netdsl,netdsl-nchw >"$OUT/warm_netdsl.log" 2>&1 &)
    (timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,32,1 --precisions bf16 \
        --systems compile,netdsl-graph >"$OUT/warm_compile.log" 2>&1 &)
    (timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128 --precisions tf32,fp32 \
        --systems compile,netdsl-graph >"$OUT/warm_compile_fp32.log" 2>&1 &)
    (timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 128,1 --precisions bf16,tf32x3,fp32 \
        --systems netdsl-s2d-graph,netdsl-grouped-graph >"$OUT/warm_levers.log" 2>&1 &)
    (timeout "${WARM_S:-240}" python3 bench/alexnet_gpu.py --warm-only --batches 1,32 --precisions bf16 \
        --systems netdsl-split-graph,netdsl-grouped-split-graph >"$OUT/warm_split.log" 2>&1 &)
fi

if wants tests; then
    # the tests append "what<TAB>error" to errors.tsv (NETDSL_GPU_REPORT): each session's rows under a comment
    echo "# bash bench/gpu_session.sh $PART: $gpu, $(date -u +%Y-%m-%d); test, error relative to the largest" \
        "|reference|" >>"$OUT/errors.tsv"
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
    box "${TEST_S:-150}" python3 -m pytest -q $workers -p no:cacheprovider -rfE \
        tests/test_gpu.py tests/test_layout.py tests/test_kernel_conv_nhwc.py tests/test_kernel_configs.py \
        tests/test_emitted.py tests/test_fusion_legality.py tests/test_kernel_conv.py tests/test_train_module.py \
        tests/test_train_triton.py tests/test_train_recompute.py tests/test_kernel_train_basic.py 2>&1 \
        | tee "$OUT/pytest.log" | tail -n 30
    # issue 13: tf32x3 against float64, space-to-depth against F.conv2d, merged towers against the golden, on the
    # GPU (errors into errors.tsv)
    box "${LEVER_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider -rfE tests/test_kernel_tf32x3.py \
        tests/test_precision.py tests/test_space_to_depth.py tests/test_merge_towers.py tests/test_split_k.py \
        tests/test_tune.py 2>&1 | tee "$OUT/pytest_levers.log" | tail -n 5
    echo "--- measured errors (relative to the largest |reference|)"
    grep -v "^#" "$OUT/errors.tsv" 2>/dev/null | sort | tail -n 40
fi

if wants train; then
    # issue 12 (bench/train_gpu.py): each system in a time box of TRAIN_BOX_S; rows stream to the log as measured;
    # each finished (batch, dtype) block is appended to the TSV and rewrites the choice table, so a cut-off run
    # keeps those. The table goes to $OUT, never over the shipped netdsl/compiler/backward_choices.json (copy it
    # there once checked).
    box "${TRAIN_GPU_S:-240}" python3 bench/train_gpu.py --batches 128,32 --dtypes bf16,tf32 \
        --box "${TRAIN_BOX_S:-50}" --tsv "$OUT/train_gpu.tsv" --write-choices \
        --choices-file "$OUT/backward_choices.json" >"$OUT/train_gpu.log" 2>&1
    tail -n 40 "$OUT/train_gpu.log"
    box "${TRAIN_S:-60}" python3 bench/train.py --nets lenet5 --gpu --steps 10 --recompute none,all \
        >"$OUT/train.log" 2>&1
    tail -n 10 "$OUT/train.log"
    # a step's memory with its batch whole and in parts (`accumulate`): the allocator's peak, a process a row
    box "${TRAIN_MEMORY_S:-60}" python3 bench/train_memory.py --gpu --batch 128 --parts 1,4,16 \
        >"$OUT/train_memory.log" 2>&1
    tail -n 6 "$OUT/train_memory.log"
    # and with layers run again in the backward pass (`recompute`), on the batch-norm net
    box "${TRAIN_MEMORY_S:-60}" python3 bench/train_memory.py --gpu --net nets/simplenet.net --batch 256 --parts 1 \
        --recompute none,cheap,all >"$OUT/train_memory_recompute.log" 2>&1
    tail -n 5 "$OUT/train_memory_recompute.log"
fi

if wants infer; then
    # issue 13's table first: bf16 at batch 128, 32 and 1, tf32 and fp32 at 128, against eager and torch.compile
    # (max-autotune at 128 bf16), all in this one run
    box "${TABLE_S:-150}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,32,1 --precisions bf16 \
        --systems netdsl-graph,eager,compile --tsv "$OUT/table.tsv" >"$OUT/table.log" 2>&1
    box "${TABLE_FP32_S:-90}" python3 bench/alexnet_gpu.py --runs 30 --batches 128 --precisions tf32,fp32 \
        --systems netdsl-graph,eager,compile --tsv "$OUT/table.tsv" >"$OUT/table_fp32.log" 2>&1
    box "${AUTOTUNE_S:-120}" python3 bench/alexnet_gpu.py --runs 30 --batches 128 --precisions bf16 \
        --systems max-autotune --tsv "$OUT/table.tsv" >"$OUT/table_autotune.log" 2>&1
    echo "--- the issue's table: net, batch, precision, system, latency ms, images/s, x floor, warm-up s"
    cat "$OUT/table.tsv" 2>/dev/null
    # issue 13's decisions: AlexNet with conv1 on conv.py vs lowered by space-to-depth, fp32 exact vs tf32x3, the
    # towers as two partitions vs merged into grouped launches, split-K convs at small batches
    box "${LEVERS_S:-150}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 --precisions bf16,tf32x3,fp32 \
        --systems netdsl-graph,netdsl-s2d-graph,netdsl-grouped-graph --tsv "$OUT/levers.tsv" >"$OUT/levers.log" 2>&1
    box "${SPLIT_S:-60}" python3 bench/alexnet_gpu.py --runs 30 --batches 1,32 --precisions bf16 \
        --systems netdsl-graph,netdsl-split-graph,netdsl-grouped-graph,netdsl-grouped-split-graph \
        --tsv "$OUT/levers.tsv" >"$OUT/levers_split.log" 2>&1
    cat "$OUT/levers.tsv" 2>/dev/null
    # netdsl tune: each kernel's candidate tiles timed here, at batch 128 then 1 in bf16 (one file), and AlexNet
    # with the tuned tiles against the launchers' own
    box "${TUNE_S:-150}" python3 -m netdsl tune --batch 128 --dtype bf16 --runs 10 -o "$OUT/tuning.json" \
        >"$OUT/tune.log" 2>&1
    box "${TUNE1_S:-60}" python3 -m netdsl tune --batch 1 --dtype bf16 --runs 10 -o "$OUT/tuning.json" \
        >"$OUT/tune_1.log" 2>&1
    grep -v "^tuning " "$OUT/tune.log" "$OUT/tune_1.log" 2>/dev/null | tail -n 40
    [ -f "$OUT/tuning.json" ] && box "${TUNED_S:-60}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 \
        --precisions bf16 --systems netdsl-graph,netdsl-tuned-graph --tuning "$OUT/tuning.json" \
        --tsv "$OUT/levers.tsv" >"$OUT/tuned.log" 2>&1
    tail -n 6 "$OUT/tuned.log" 2>/dev/null
    # the tf32 tiles, never swept: tuned at batch 128 into a file of their own (a tuning file holds one dtype)
    box "${TUNE_TF32_S:-90}" python3 -m netdsl tune --batch 128 --dtype tf32 --runs 10 -o "$OUT/tuning_tf32.json" \
        >"$OUT/tune_tf32.log" 2>&1
    grep -v "^tuning " "$OUT/tune_tf32.log" 2>/dev/null | tail -n 20
    [ -f "$OUT/tuning_tf32.json" ] && box "${TUNED_S:-60}" python3 bench/alexnet_gpu.py --runs 30 --batches 128 \
        --precisions tf32 --systems netdsl-graph,netdsl-tuned-graph --tuning "$OUT/tuning_tf32.json" \
        --tsv "$OUT/levers.tsv" >"$OUT/tuned_tf32.log" 2>&1
    tail -n 4 "$OUT/tuned_tf32.log" 2>/dev/null
    # netdsl-one-stream: both towers on one stream, against netdsl's stream each (do they overlap?), and both
    # against the towers merged into grouped launches (netdsl-grouped)
    box "${BENCH_S:-100}" python3 bench/alexnet_gpu.py --runs 30 --batches 128,1 --precisions bf16 \
        --systems netdsl,netdsl-one-stream,netdsl-grouped,netdsl-nchw --tsv "$OUT/bench.tsv" >"$OUT/bench.log" 2>&1
    tail -n 5 "$OUT/bench.log"
    # VGG-16, the second net against the same anchors (larger convs)
    box "${VGG_S:-120}" python3 bench/alexnet_gpu.py --net vgg16 --runs 20 --batches 128,32 --precisions bf16 \
        --systems netdsl-graph,eager,compile --tsv "$OUT/bench.tsv" >"$OUT/bench_vgg16.log" 2>&1
    tail -n 3 "$OUT/bench_vgg16.log"
    tail -n 3 "$OUT"/warm_*.log
    echo "--- bench rows: net, batch, precision, system, latency ms, images/s, x floor, warm-up s"
    cat "$OUT/bench.tsv" 2>/dev/null
    # the convs in tf32x3 against tf32, conv1 as a space-to-depth conv, the fc / LRN tiles
    box "${SWEEP_S:-60}" python3 bench/conv_sweep.py --batch 128 --dtypes tf32x3,tf32 --layers conv1,conv2,conv4 \
        --configs 1,2,4 >"$OUT/conv_tf32x3.log" 2>&1
    grep -P "^conv\d\t" "$OUT/conv_tf32x3.log"
    box "${SWEEP_S:-60}" python3 bench/conv_sweep.py --batch 128 --dtypes bf16 --layers conv1 >"$OUT/conv1.log" 2>&1
    grep -P "^conv1\t" "$OUT/conv1.log"
    box "${SWEEP_S:-60}" python3 bench/step_sweep.py --batches 128,1 >"$OUT/step_sweep.log" 2>&1
    # where the time goes: every step of AlexNet at batch 128 in bf16, channels-last and all-NCHW, and merged
    for layout in auto nchw; do
        box "${PROFILE_S:-40}" python3 -m netdsl run --random 128 --batch 128 --dtype bf16 --layout $layout \
            --time --top 1 >"$OUT/profile_$layout.log" 2>&1
    done
    box "${PROFILE_S:-40}" python3 -m netdsl run --random 128 --batch 128 --dtype bf16 --merge-towers \
        --time --top 1 >"$OUT/profile_merged.log" 2>&1
    grep -v "^input " "$OUT/profile_auto.log" 2>/dev/null | head -n 60
    grep -v "^input " "$OUT/profile_merged.log" 2>/dev/null | head -n 40
fi
echo "--- $(( $(date +%s) - START )) s of the budget of ${BUDGET_S} s"
