#!/usr/bin/env bash
# Device check (GPU/TPU): search step, final step and the latency bench at their real sizes,
# the steps in float32 and bfloat16, and a real search slice (bench/search_slice.py: 20
# supernet steps on host batches and 10 reward evaluations, the second epoch under
# jax.profiler), into one JSON: bench/results/device_check.json (img/s, step ms, peak device
# memory, peak RSS, XLA temp bytes, compile s; the latency bench's and the slice's own JSON).
# The latency bench runs float32 here (its --dtype bfloat16 times fp_jax's executors in
# bfloat16; not in this budget). A persistent compilation cache (DEVICE_CHECK_CACHE, default
# ~/.cache/fp_jax/jax_cache) serves the parts' shared programs and any rerun.
#
#   bash bench/device_check.sh            # real sizes, on the machine's accelerator
#   bash bench/device_check.sh --small    # tiny sizes (a dry run; works on CPU)
#
# Needs only this repository and the wheels the README names
# (pip install -r requirements.txt "jax[cuda12]==0.10.2"). Budget: 8 minutes on one GPU;
# every part has its own time limit and a part that fails or times out is recorded as such.
set -u
cd "$(dirname "$0")/.."
SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1
OUT=${DEVICE_CHECK_OUT:-bench/results/device_check.json}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # peak device memory = what the step uses
export TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=${DEVICE_CHECK_CACHE:-$HOME/.cache/fp_jax/jax_cache}

if [ $SMALL = 1 ]; then
  SEARCH="--num_layers 0 --out_filters 4 --batch 8 --image 8 --steps 2 --warmup 1"
  FINAL="--num_layers 0 --out_filters 4 --batch 8 --image 8 --steps 2 --warmup 1"
  LAT="--num_layers 1 --out_filters 8 --images 5 --batch 4 --warmup 2 --no_runtimes"
  SLICE="--config configs/smoke.py --small --steps 4 --rewards 3"
  LIMIT=(150 150 150 150 120 300)
else
  SLICE="--config configs/cifar.py --steps 20 --rewards 10"
  SEARCH="--num_layers 6 --out_filters 20 --batch 160 --image 32 --steps 10 --warmup 2"
  FINAL="--num_layers 15 --out_filters 36 --batch 144 --image 32 --steps 10 --warmup 2"
  LAT="--images 300 --batch 64 --warmup 20 --no_runtimes"
  LIMIT=(60 55 90 85 80 90)         # seconds: 460 s of the 480 s budget
fi
python -c "import jax; print('devices:', jax.devices())" || exit 1
start=$(date +%s)
run() {  # name limit command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$TMP/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}" > "$TMP/$name.status"
  echo "[$name] rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n 8 "$TMP/$name.log"
}
# one process per step and dtype: each compiles once, and its peaks (device memory, RSS) are
# that variant's own (bench/final_step.py records the process's peaks)
i=0
for kind in search_step final_step; do
  for dtype in float32 bfloat16; do
    if [ $kind = search_step ]; then K="--kind supernet $SEARCH"; else K="--kind fixed $FINAL"; fi
    run "${kind}_$dtype" "${LIMIT[$i]}" python -m bench.final_step $K --dtypes $dtype --no_rss \
      --out "$TMP/${kind}_$dtype.json"
    i=$((i + 1))
  done
done
run latency "${LIMIT[4]}" python -m bench.latency $LAT --out "$TMP/latency.json"
run search_slice "${LIMIT[5]}" python -m bench.search_slice $SLICE --out "$TMP/search_slice.json" \
  --trace_dir "${DEVICE_CHECK_TRACE:-$TMP/trace}"
python - "$TMP" "$OUT" "$start" "$SMALL" <<'PY'
import json, os, sys, time
tmp, out, start, small = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
import jax
res = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
       "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "small": small,
       "total_seconds": int(time.time()) - start, "parts": {}}
for name in ("search_step_float32", "search_step_bfloat16", "final_step_float32",
             "final_step_bfloat16", "latency", "search_slice"):
  part = json.load(open(os.path.join(tmp, name + ".status")))
  path = os.path.join(tmp, name + ".json")
  if os.path.exists(path):
    r = json.load(open(path))
    if name in ("latency", "search_slice"):
      part["result"] = r
    else:
      part["args"] = r["args"]
      part["peak_device_bytes"] = r.get("process_peak_device_bytes")
      part["peak_rss_bytes"] = r.get("process_peak_rss_bytes")
      part["variants"] = {k: {f: v.get(f) for f in ("img_s", "median_s", "compile_s",
                                                   "xla_temp_bytes", "median_user_s")}
                          for k, v in r["variants"].items()}
      for v in part["variants"].values():
        v["step_ms"] = 1e3 * v.pop("median_s")
      part["table"] = r["table"]
  else:
    part["log_tail"] = open(os.path.join(tmp, name + ".log")).read()[-3000:]
  res["parts"][name] = part
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(f"wrote {out} ({res['total_seconds']} s)")
PY
