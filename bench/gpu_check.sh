#!/usr/bin/env bash
# The device check: on a fresh CUDA machine with only this repository, in under 10 minutes,
#   1. installs what the GPU path needs (a venv with the gpu and dev extras: onnxruntime-gpu, tensorrt,
#      pycuda, onnx, pytest; system site packages visible, so a preinstalled torch or TensorRT is used),
#   2. gets the default pack (PACK=dir to use one carried along; else exports it, which needs torch),
#   3. builds its TensorRT engine (anomaly-edge export engine),
#   4. runs the GPU tests (pytest -m gpu),
#   5. compares every GPU backend with ONNX Runtime on the CPU (bench/gpu_compare.py: max abs diff of
#      features, maps and image scores; frames/s at batch 1 and 8),
# and writes one JSON, $OUT/gpu_check.json (./gpu_check.json without $OUT), whatever fails on the way:
# each step records its status, seconds and the tail of its log.
#
#   bash bench/gpu_check.sh     # PYTHON=python3 PACK=packs/default BUDGET_S=570 SECONDS_PER_RUN=5 SKIP_INSTALL=0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
PY="${PYTHON:-python3}"
PACK="${PACK:-packs/default}"
BUDGET_S="${BUDGET_S:-570}"
START=$(date +%s)
STEPS="$WORK/steps.jsonl"
: > "$STEPS"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS COMMAND...: runs it with a timeout (never past the budget), logs to $WORK/NAME.log
step() {
  local name=$1 max=$2; shift 2
  local t=$(left)
  (( t < max )) && max=$t
  if (( max < 5 )); then
    echo "{\"step\": \"$name\", \"status\": \"skipped: out of time\"}" >> "$STEPS"; return 1
  fi
  echo "== $name (up to ${max}s)" >&2
  local t0=$(date +%s)
  timeout "$max" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  "$PY" - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$WORK/$name.log" >> "$STEPS" <<'EOF'
import json, sys
name, rc, secs, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
status = "ok" if rc == 0 else ("timed out" if rc == 124 else f"failed (exit {rc})")
print(json.dumps({"step": name, "status": status, "seconds": secs, "log_tail": open(log, errors="replace").read()[-3000:]}))
EOF
  return $rc
}

step gpu_info 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader

if [ "${SKIP_INSTALL:-0}" = 1 ]; then  # an environment that already has the gpu and dev extras
  VPY="$PY"
else
  VENV="$WORK/venv"
  step venv 60 "$PY" -m venv --system-site-packages "$VENV"
  VPY="$VENV/bin/python"
  [ -x "$VPY" ] || VPY="$PY"
  step install 240 "$VPY" -m pip install --quiet -e '.[gpu,dev]'
fi
step versions 30 "$VPY" -c "
import importlib.metadata as m, json
out = {}
for d in ('onnxruntime-gpu', 'onnxruntime', 'tensorrt', 'tensorrt-cu12', 'tensorrt-cu13', 'pycuda', 'onnx', 'numpy'):
    try: out[d] = m.version(d)
    except m.PackageNotFoundError: pass
import onnxruntime as ort
out['providers'] = ort.get_available_providers()
print(json.dumps(out))"

if [ ! -f "$PACK/pack.yaml" ]; then
  step install_export 120 "$VPY" -m pip install --quiet -e '.[export]' \
    && step export_pack 120 "$VPY" -m edge.cli.main export default --out "$WORK/pack" --no-llm --force
  PACK="$WORK/pack"
else
  cp -r "$PACK" "$WORK/pack" && PACK="$WORK/pack"
fi
step export_engine 240 "$VPY" -m edge.cli.main export engine --pack "$PACK"
export ANOMALY_EDGE_GPU_PACK="$PACK"
step pytest_gpu 180 "$VPY" -m pytest -q -m gpu -rs --junitxml="$WORK/pytest-gpu.xml" tests/
step compare 200 "$VPY" bench/gpu_compare.py --pack "$PACK" --seconds "${SECONDS_PER_RUN:-5}" --json "$WORK/compare.json"

"$PY" - "$STEPS" "$WORK" "$OUT_DIR/gpu_check.json" "$START" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
steps_file, work, out, start = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
steps = [json.loads(l) for l in open(steps_file) if l.strip()]
result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": int(time.time()) - start,
          "steps": {s.pop("step"): s for s in steps}}
info = result["steps"].get("gpu_info", {})
result["gpu"] = info.get("log_tail", "").strip() if info.get("status") == "ok" else None
try:
    result["versions"] = json.loads(result["steps"]["versions"]["log_tail"].strip().splitlines()[-1])
except (KeyError, ValueError, IndexError):
    result["versions"] = None
junit = work / "pytest-gpu.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:300]}"
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    result["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["pytest_gpu"]["cases"] = cases
compare = work / "compare.json"
result["compare"] = json.loads(compare.read_text()) if compare.is_file() else None
out.write_text(json.dumps(result, indent=1))
print(f"wrote {out}")
print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1)[:6000])
EOF
