#!/bin/bash
# The measured run: fresh cache, no flags but --variant and --output-dir; 2 threads (gtpt train's default).
echo -10 > /proc/self/autogroup  # this session against the others (autogroups share the CPU by group, not by nice)
cd /work/wt-synth
. /work/venv/bin/activate
export PYTHONPATH=/work/wt-synth GTPT_CACHE=/tmp/synthx/final/cache
R=/tmp/synthx/final
rm -rf $R/cache $R/run
{ echo "start $(date -u +%FT%TZ) uptime: $(uptime) autogroup: $(cat /proc/self/autogroup)"; } > $R/load.txt
/usr/bin/time -v gtpt train --variant gtpt-t --output-dir $R/run > $R/console.txt 2>&1
echo "rc $?" >> $R/load.txt
{ echo "end $(date -u +%FT%TZ) uptime: $(uptime)"; } >> $R/load.txt
