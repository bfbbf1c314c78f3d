#!/bin/bash
# round 7 probe: ncu over bench/ncu_gemm.py at two shapes; reports under $OUT
export PYTHONPATH=src
ncu --version | tail -1
ncu --query-metrics --chip gh100 2>&1 | grep -iE "gmma|pipe_tensor|tensor_op" > $OUT/metrics.txt
S="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats"
for shape in 16384,4096,4096 4608,3072,3072; do
  timeout 200 ncu --clock-control none --nvtx --nvtx-include "prof/" $S python3 bench/ncu_gemm.py --shape $shape > $OUT/ncu_${shape//,/x}.txt 2>&1
  echo "$shape rc=$?"; grep -c "Section: SpeedOfLight\|GPU Speed Of Light" $OUT/ncu_${shape//,/x}.txt
done
