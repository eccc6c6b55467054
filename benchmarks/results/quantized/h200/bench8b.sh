#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/bench.log
timeout 150 python -m benchmarks.jax_bench --section decode --jobs tova/512/max@split:pallas --positions 4096 --state-dtype int8 --json $OUT/decode-int8.json >> $L 2>&1; echo "rc=$?" >> $L
timeout 100 python -m benchmarks.jax_bench --section probe --probe-cases tova/512/1 --variants fused:pallas --no-probe-window --n-steps 32 --state-dtype int8 --json $OUT/probe-int8.json >> $L 2>&1; echo "rc=$?" >> $L
python3 -c "
import json
for f in ['decode-int8','probe-int8']:
    d=json.load(open('$OUT/'+f+'.json'))
    for r in d['decode']+d['probe']:
        if 'step_ms' in r: print(f, r['batch'], r['step_ms'], r['tokens_per_s'], r.get('bw_fraction'))
"
