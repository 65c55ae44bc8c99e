#!/bin/bash
# closing run of session 11: old = 3cf8b15, new = main at dfca528 (its product code is 56e5204's); alternating order per round.
# /tmp/m5/kdp-{old,new}: CGO_ENABLED=0 go build ./cmd/kata-dp; lbperf-{old,new}: go test -c ./bench/lbperf;
# ctlperf.test: go test -c ./bench/ctlperf at 3cf8b15 (for both agents). Output: /tmp/m5/results.txt
R=${1:-12}
out=/tmp/m5/results.txt
: > $out
cd /work/main
for i in $(seq $R); do
  if [ $((i % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  echo "ROUND $i $(cut -d' ' -f1-3 /proc/loadavg)" >> $out
  for b in $order; do
    for spec in 'PerPacket$:5000x' 'PerPacketRepeat$:20000x' 'NewConnTable$:5000x'; do
      (cd bench/lbperf && /tmp/m5/lbperf-$b -test.run XXX -test.bench "${spec%%:*}" -test.benchtime "${spec##*:}" 2>&1 | grep '^Benchmark' | sed "s/^/$b /") >> $out
    done
  done
  for b in $order; do
    (cd bench/ctlperf && KDP_CTLPERF_AGENT=/tmp/m5/kdp-$b /tmp/m5/ctlperf.test -test.run XXX -test.bench 'RestoreCLI$' -test.benchtime 10x 2>&1 | grep '^Benchmark' | sed "s/^/$b /") >> $out
  done
done
echo DONE >> $out
