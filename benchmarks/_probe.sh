export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
PYTHONPATH=. python -m benchmarks.jax_bench --section decode --model llama2-7b --json $OUT/probe.json --deadline $(( $(date +%s) + 330 )) --jobs tova/512/1@split:pallas,tova/512/32@split:pallas,full/F/32@split:pallas,tova/512/max@split:pallas,full/F/max@split:pallas,window/512/max@split:pallas,tova/256/max@split:pallas --positions 4096 2>&1 | grep -v "^W1129\|^\*" | tail -5
python -c "
import json; r=json.load(open('$OUT/probe.json'))
for d in r['decode']: print(d['variant'],d['policy'],d['capacity'],d['batch'],round(d['step_ms'],2),round(d['tokens_per_s']),round(d.get('bw_fraction',0),3),d.get('temp_bytes'),round(d.get('compile_s')), d.get('shrinks'), d.get('state_copies'))
for e in r['errors']: print('ERR',str(e)[:700])
for e in r['skipped']: print('SKIP',e)
print(r.get('bandwidth'), r.get('memory_budget'))"
