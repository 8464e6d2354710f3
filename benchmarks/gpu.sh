#!/usr/bin/env bash
# GPU readiness check of optax_sign. Run from the repository root:
#
#   bash benchmarks/gpu.sh [OUT]               # OUT: this, else $OUT, else benchmarks/out
#   QUICK=1 bash benchmarks/gpu.sh /tmp/out    # small sizes: a CPU smoke run (under a minute)
#
# On whatever JAX sees (the CPU when it sees no accelerator, and it says so):
#   1. step_time: the update-step time table (optax_sign.bench.step_time);
#   2. wire:      the vote bytes table (optax_sign.bench.wire), always on
#                 simulated CPU devices: one GPU is one device, too few for a
#                 vote, and the bytes come from the compiled HLO, whatever the
#                 device;
#   3. train:     a short training comparison (python -m optax_sign.bench).
# Each part runs under `timeout` (140 + 80 + 170 s, each plus 10 s to be
# killed; with the device check's 30 s and the report's 20 s, at most 470 s
# in all). A part that fails or runs out of time is reported as such and the
# others still run. Then OUT/report.md (Markdown) and OUT/summary.json name
# the device (jax.devices()[0].device_kind) and hold the three tables;
# OUT/*.log keep each part's output. The training run uses the benchmark's
# persistent compilation cache (~/.cache/optax_sign/jax by default).
#
# Installs nothing: it needs the package with its bench extra
# (pip install -e ".[bench]") and, for a GPU, a CUDA build of jax.
# PYTHON selects the interpreter (default: python). Exits 1 if a part failed.
set -u -o pipefail

out="${1:-${OUT:-benchmarks/out}}"
py="${PYTHON:-python}"
helper="$(dirname "$0")/gpu_report.py"
mkdir -p "$out"
# Drop the outputs of an earlier run, so that a failed part shows as failed.
rm -rf "$out/parts.tsv" "$out"/*.log "$out/step_time.json" "$out/wire.json" \
  "$out/train" "$out/report.md" "$out/summary.json"

if [[ "${QUICK:-0}" == 1 ]]; then
  step_args=(--params 2e5 --repeats 3 --only "alias_sign_sgd (full)")
  wire_args=(--size 4096 --workers 2 4)
  train_args=(--tiny --task logreg)
else
  step_args=(--params 50e6 --repeats 20)
  wire_args=(--size 262144 --workers 2 4 8 16 64)
  train_args=(--task logreg mlp --steps 300)
fi

# run_part NAME SECONDS COMMAND...: runs COMMAND under timeout, its output to
# the terminal and to OUT/NAME.log; appends NAME, exit code, seconds and the
# command to OUT/parts.tsv.
run_part() {
  local name=$1 budget=$2
  shift 2
  echo "== $name (at most $budget s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" \
    "$(printf '%q ' "$@")" >> "$out/parts.tsv"
}

read -r backend count kind < <(timeout 30 "$py" "$helper" device 2>/dev/null)
if [[ -z "${backend:-}" ]]; then
  echo "gpu.sh: JAX does not start with $py; is the package installed?" >&2
  exit 1
fi
if [[ "$backend" == cpu ]]; then
  echo "No accelerator visible to JAX: running everything on the CPU ($kind)."
else
  echo "JAX sees $count $backend device(s): $kind."
fi

run_part step_time 140 "$py" "$helper" step-time "$out" "${step_args[@]}"
run_part wire 80 "$py" "$helper" wire "$out" "${wire_args[@]}"
run_part train 170 "$py" -m optax_sign.bench "${train_args[@]}" \
  --no-progress --out "$out/train"
timeout 20 "$py" "$helper" report "$out"
echo "report: $out/report.md"
if cut -f2 "$out/parts.tsv" | grep -qv '^0$'; then
  echo "gpu.sh: a part failed or ran out of time (see $out/report.md)" >&2
  exit 1
fi
