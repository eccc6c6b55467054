#!/usr/bin/env bash
# H200: the 8-bit state against bfloat16 (tova C=512, Llama-2-7B shape, random bf16 weights)
set -u
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/bench.log
END=$(( $(date +%s) + ${BUDGET:-570} ))
run() { local t=$1; shift; local left=$(( END - $(date +%s) )); [ $left -lt 40 ] && { echo "### skipped (time) $*" >> $L; return; }
  [ $t -gt $left ] && t=$left; echo "### $(date +%T) $*" >> $L; local S=$(date +%s)
  timeout "$t" "$@" >> $L 2>&1; echo "### rc=$? took $(( $(date +%s)-S )) s" >> $L; }
for sd in bfloat16 int8; do
  run 150 python -m benchmarks.jax_bench --section probe --probe-cases tova/512/1 --variants fused:einsum,fused:pallas --no-probe-window --n-steps 32 --state-dtype $sd --json $OUT/probe-$sd.json
done
for sd in bfloat16 int8; do
  run 160 python -m benchmarks.jax_bench --section decode --jobs tova/512/max@split:pallas --positions 4096 --state-dtype $sd --json $OUT/decode-$sd.json
done
run 200 python -m benchmarks.jax_bench --section probe --probe-cases tova/512/1 --variants fused:pallas --no-probe-window --n-steps 32 --state-dtype fp8 --json $OUT/probe-fp8.json
grep -h "tok/s\|ms/step\|frac\|Error\|error" $L | tail -60
