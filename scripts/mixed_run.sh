#!/usr/bin/env bash
# One run mixing a GPU worker and CPU workers on one machine (the lent H200 host): a
# coordinator on the CPU, `--device cuda` for one worker and `cpu:N` for the others, for
# SECONDS seconds; then the coordinator's status, leaderboard and re-run counters, and
# each worker's cold start. What BENCHMARKS.md's "One run, a GPU and CPUs" reports.
#
#   scripts/mixed_run.sh HIVETRAIN_BIN OUT_DIR [SECONDS] [CPU_WORKERS] [THREADS_EACH]
#
# Units are sized per worker (`schedule.unit_ms`, UNIT_MS in the environment, default
# 20 s; 0 turns sizing off). The run trains GPT-2 `small` from scratch, or, with
# FINETUNE_BASE=PATH (a GGUF, e.g. SmolLM2-135M-Instruct's), a rank-8 LoRA adapter on
# that base over data/shakespeare-chat.jsonl, as `hivetrain demo --finetune` does (8
# steps a base unit). OUTER_LR and OUTER_MOMENTUM set DiLoCo's outer step (default: the
# run's default).
set -euo pipefail
bin=$(realpath "$1")
out=$(realpath -m "$2")
seconds=${3:-240}
cpu_workers=${4:-3}
threads=${5:-3}
mkdir -p "$out"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18480
if [ -n "${FINETUNE_BASE:-}" ]; then
    cat > "$work/run.toml" <<EOF
corpus = "$(realpath data/shakespeare-chat.jsonl)"
seq = 256
batch = 2
holdout_batches = 4
[finetune]
base = "$(realpath "$FINETUNE_BASE")"
data = "chat"
lora = { rank = 8, alpha = 16.0, targets = ["q", "k", "v", "o", "gate", "up", "down"] }
[schedule]
units_per_round = 4
min_updates = 2
steps_per_unit = 8
inner_lr = 1e-3
unit_ms = ${UNIT_MS:-20000}
EOF
else
    cat > "$work/run.toml" <<EOF
preset = "small"
[schedule]
units_per_round = 4
min_updates = 2
unit_ms = ${UNIT_MS:-20000}
EOF
fi
if [ -n "${OUTER_LR:-}${OUTER_MOMENTUM:-}" ]; then
    cat >> "$work/run.toml" <<EOF
[outer]
rule = "diloco"
lr = ${OUTER_LR:-0.7}
momentum = ${OUTER_MOMENTUM:-0.9}
EOF
fi
cat >> "$work/run.toml" <<EOF
[spot_check]
replica_wait_ms = 30000
[devices]
holdout = "cpu:2"
scoring = "cpu:2"
replay = "cpu:2"
EOF
"$bin" coordinator --config "$work/run.toml" --dir "$work/coord" --bind 127.0.0.1:$port \
    > "$out/coordinator.log" 2>&1 &
for _ in $(seq 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" \
        2>/dev/null && break
    sleep 0.5
done
HIVETRAIN_KEY=$work/gpu.key "$bin" worker --coordinator http://127.0.0.1:$port --name gpu-rig \
    --device cuda --data-dir "$work/gpu-data" > "$out/worker-gpu.log" 2>&1 &
for i in $(seq "$cpu_workers"); do
    HIVETRAIN_KEY=$work/cpu$i.key "$bin" worker --coordinator http://127.0.0.1:$port \
        --name "laptop-$i" --device "cpu:$threads" --data-dir "$work/cpu$i-data" \
        > "$out/worker-cpu$i.log" 2>&1 &
done
sleep "$seconds"
for route in v1/status v1/leaderboard v1/stats metrics; do
    python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/$route').read().decode())" \
        > "$out/$(basename $route).out" 2>&1 || true
done
grep -h "cold start\|this machine" "$out"/worker-*.log || true
# Each accepted update: its unit's steps, weight, worker, class and tier.
python3 - "$work/coord" > "$out/updates.out" <<'PY' || true
import sqlite3, sys, glob
db = glob.glob(sys.argv[1] + "/**/hivetrain.sqlite3", recursive=True)
con = sqlite3.connect(db[0])
for row in con.execute("SELECT u.unit, u.round, n.steps, u.weight, w.name, u.tier, substr(u.class, 1, 24) FROM updates u JOIN units n ON n.id = u.unit JOIN workers w ON w.id = u.worker ORDER BY u.unit"):
    print(*row)
PY
cat "$out/updates.out" || true
# Each re-run: the unit, its state and the distance of the re-run from the update.
python3 - "$work/coord" > "$out/checks.out" <<'PY' || true
import sqlite3, sys, glob
db = glob.glob(sys.argv[1] + "/**/hivetrain.sqlite3", recursive=True)
con = sqlite3.connect(db[0])
for row in con.execute("SELECT c.unit, n.steps, c.state, c.distance, w.name FROM checks c JOIN units n ON n.id = c.unit JOIN workers w ON w.id = c.worker WHERE c.state != 'unchecked' ORDER BY c.unit"):
    print(*row)
PY
cat "$out/checks.out" || true
