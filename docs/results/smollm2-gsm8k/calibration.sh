#!/bin/bash
# issue [GSM8K] calibration, as committed in conf/smollm2_gsm8k.yaml (C1 then C2), from the worktree /work/cal-src
cd /work/cal-src
export PYTHONPATH=/work/cal-src
OFF="data.source=benchmark data.path=/work/shared/data/benchmarks/gsm8k_train.jsonl run.progress_bar=false run.threads=1 run.keep=final"
python -m stagewise_pl.fit conf=smollm2_gsm8k $OFF "phases=[{name: base, kind: eval}]" eval.before=false \
  eval.benchmarks=[/work/shared/data/benchmarks/gsm8k_train.jsonl] eval.limit=600 eval.k=8 run.dir=/work/runs/gsm8k-cal/c1 > /work/runs/gsm8k-cal/c1.log 2>&1
echo "c1 rc=$?" >> /work/runs/gsm8k-cal/done
python -m stagewise_pl.fit conf=smollm2_gsm8k $OFF data.skip=600 data.limit=900 data.target=reference \
  "phases=[{name: sft30, kind: sft, steps: 30}, {name: sft60, kind: sft, steps: 30}, {name: sft90, kind: sft, steps: 30}]" \
  eval.benchmarks=[/work/shared/data/benchmarks/gsm8k_train.jsonl] eval.limit=600 eval.k=0 run.dir=/work/runs/gsm8k-cal/c2 > /work/runs/gsm8k-cal/c2.log 2>&1
echo "c2 rc=$?" >> /work/runs/gsm8k-cal/done
