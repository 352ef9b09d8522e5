#!/usr/bin/env bash
# Quiet-machine CPU benchmarks on the device host: each benchmark pinned to its own 2 cores.
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
lscpu | grep -E "Model name|^CPU\(s\)" > $OUT/cpu.txt
run() { local cores=$1 name=$2; shift 2
  ( timeout 400 taskset -c $cores python3 "$@" > $OUT/$name.jsonl 2> $OUT/$name.err ) & }
run 0,1 st_a benchmarks/step_time.py --steps 10 --schedules gpipe,1f1b,interleaved-1f1b
run 2,3 st_b benchmarks/step_time.py --steps 10 --schedules zb-h1,zb-h2,zb-v
run 4,5 st_c benchmarks/step_time.py --steps 10 --schedules dualpipev,v-half,v-min
run 6,7 scaling benchmarks/scaling.py --steps 3
run 8,9 plan_acc benchmarks/plan_accuracy.py --reps 5
run 10,11 p3d benchmarks/parallel_3d.py --steps 8
run 12,13 sim_acc benchmarks/sim_accuracy.py
wait
tail -n 3 $OUT/*.err
