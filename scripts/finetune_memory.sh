#!/usr/bin/env bash
# Peak memory of a fine-tune's worker and coordinator (BENCHMARKS.md, "What a volunteer's
# worker holds"): the fine-tune demo's run with one unit a round, served by
# `hivetrain coordinator` on loopback; one `hivetrain worker --max-units 1` under
# /usr/bin/time -v (its maximum resident set), then the coordinator's VmHWM once the unit
# has been scored, re-run and aggregated into version 1, and 90 s later.
#
# usage: scripts/finetune_memory.sh [BIN] [PORT]   (run from the repository root;
#        BIN defaults to target/release/hivetrain, PORT to 18480)
set -u
BIN=${1:-target/release/hivetrain}
PORT=${2:-18480}
D=$(mktemp -d)
trap 'kill $C 2>/dev/null; rm -rf "$D"' EXIT
"$BIN" demo --finetune --print-config > "$D/ft.toml"
sed -i 's/^units_per_round = .*/units_per_round = 1/; s/^min_updates = .*/min_updates = 1/' "$D/ft.toml"
"$BIN" coordinator --config "$D/ft.toml" --dir "$D/run" --bind "127.0.0.1:$PORT" > "$D/coord.log" 2>&1 &
C=$!
for i in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
echo "coordinator up after $i s: $(grep VmHWM /proc/$C/status)"
/usr/bin/time -v "$BIN" worker --coordinator "http://127.0.0.1:$PORT" --max-units 1 --device cpu:2 \
    --data-dir "$D/w" --key "$D/w.key" > "$D/worker.log" 2> "$D/worker.time"
echo "worker exit $?: $(grep -E 'Maximum resident' "$D/worker.time")"
for i in $(seq 1 900); do
    v=$(curl -sf "http://127.0.0.1:$PORT/v1/status" | python3 -c "import json,sys;print(json.load(sys.stdin)['version'])" 2>/dev/null)
    [ "$v" = "1" ] && break
    sleep 1
done
echo "version $v: coordinator $(grep -E 'VmHWM|VmRSS' /proc/$C/status | tr '\n' ' ')"
sleep 90
echo "90 s later: coordinator $(grep -E 'VmHWM|VmRSS' /proc/$C/status | tr '\n' ' ')"
