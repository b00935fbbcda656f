# Sourced by the prepared GPU runs (bench/gpu_suite.sh, bench/gpu_followup.sh): the shared environment
# and `step NAME SECONDS CMD...`, which runs CMD with a time limit into $log, keeps going on failure and
# logs the exit status. The caller sets `log` (a file under $OUT) after sourcing.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LACO_NO_EXT=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
step() {
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "== $name: exit $?" | tee -a "$log"
}
