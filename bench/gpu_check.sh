#!/usr/bin/env bash
# GPU check for an H200 (or any CUDA machine) with no network: install fastkd from this checkout
# without build isolation or dependencies, run the GPU tests, check which dense kernels run here
# (two_pass, resident: bench/kernel_check.py, against two_pass), time the one-CTA resident kernel
# at V = 4096 and 8192, profile the kernels (bench/profile_kernels.py), then `fastkd bench --preset
# headline fused-linear` (the headline kernel cases, then the fused linear + KD cases). Everything lands flat in OUTDIR (at most 8 files), in
# under 8 minutes:
#   gpu_check.log    versions, nvidia-smi, install, tests, the kernel check, the bench's progress and tables
#   env.json         GPU, torch, triton, python, date, commit, exit status of each step
#   resident_v8192.tar   the V = 8192 bench's CSV / JSON / tables
#   profile.tar      bench/profile_kernels.py: DRAM bytes per element, issue-slot use, occupancy (ncu)
#   <gpu>_<date>_headline+fused-linear.csv / .json / .md / _summary.md, and its PNGs (packed into
#   plots.tar when there would be more than 8 files); see bench/results/README.md
# Optional wheels (e.g. liger-kernel) placed in .whl/ are installed into /tmp/site first; .whl/ is
# git-ignored, so a remote run must carry it (the device tool: carry=[".whl"]).
# Usage: bash bench/gpu_check.sh OUTDIR      (BENCH_PRESET=smoke: a dry run of the plumbing on a CPU)
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
LOG="$OUT/gpu_check.log"
: >"$LOG"
START=$(date +%s)
BUDGET_S=430 # bench ends by then (+30 s to write its files on SIGTERM): under 8 minutes in all
PY=${PYTHON:-python3}

log() { echo "== $* ($(($(date +%s) - START)) s)" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# Commit of the checkout, for copies that may lack .git.
FASTKD_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$FASTKD_COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    FASTKD_COMMIT="$FASTKD_COMMIT-dirty"
fi
export FASTKD_COMMIT

log "machine"
{
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PY" --version 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
    echo "commit $FASTKD_COMMIT"
} >>"$LOG" 2>&1

WHEEL_RC=skipped
if compgen -G ".whl/*.whl" >/dev/null; then
    log "optional wheels: $(cd .whl && echo ./*.whl)"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    WHEEL_RC=$?
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "install fastkd (editable, no build isolation, no deps)"
PIP_BREAK_SYSTEM_PACKAGES=1 timeout 120 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1
INSTALL_RC=$?
if ! (cd /tmp && "$PY" -c "import fastkd.bench, fastkd.kernels.kd_loss") >>"$LOG" 2>&1; then
    # No setuptools or a read-only site-packages: lay the package out by hand (fastkd.kernels is
    # kernels/ in the checkout) and put it on the path.
    log "pip install did not give an importable fastkd (rc $INSTALL_RC): using a copy on PYTHONPATH"
    rm -rf /tmp/fastkd_pkg && mkdir -p /tmp/fastkd_pkg
    cp -r fastkd /tmp/fastkd_pkg/fastkd && rm -rf /tmp/fastkd_pkg/fastkd/kernels
    cp -r kernels /tmp/fastkd_pkg/fastkd/kernels
    export PYTHONPATH=/tmp/fastkd_pkg${PYTHONPATH:+:$PYTHONPATH}
    INSTALL_RC="fallback:$INSTALL_RC"
fi
(cd /tmp && "$PY" -c "import importlib.util, fastkd; print('fastkd from', fastkd.__file__, '| liger_kernel:',
    importlib.util.find_spec('liger_kernel') is not None)") >>"$LOG" 2>&1

log "GPU tests"
# The tests marked gpu (compiled kernels on CUDA tensors against the float64 reference, compile,
# autocast); the rest of the suite drives CPU tensors through the interpreter, which CI covers.
# pytest-xdist, where installed, spreads the kernels' compilation over 8 workers.
PARALLEL=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo "-n 8")
timeout -k 10 150 "$PY" -m pytest -q tests bench -m "gpu and not slow" $PARALLEL --benchmark-disable \
    -p no:cacheprovider >>"$LOG" 2>&1
TESTS_RC=$?
[ "$TESTS_RC" = 124 ] && log "tests stopped by their 150 s timeout"

PRESET=${BENCH_PRESET:-headline fused-linear}
SMALL="" # a dry run on a CPU (BENCH_PRESET=smoke): tiny shapes through the interpreter
[ "$PRESET" = smoke ] && SMALL="--n 4 --v 64,100"
log "dense kernels: which run here and each against two_pass"
# A kernel the launcher refuses (the resident kernel beyond 8192 columns) is reported as
# unavailable, not as failed; a mismatch with the two-pass kernel fails the check.
# shellcheck disable=SC2086  # SMALL is a list of words
timeout -k 10 90 "$PY" bench/kernel_check.py $SMALL >>"$LOG" 2>&1
KERNELS_RC=$?
[ "$KERNELS_RC" = 1 ] && log "kernel check: a kernel differs from two_pass (see the log)"

# The resident kernel runs on rows of up to 8192 columns, shorter than the headline cases: timed
# here beside two_pass at the V where auto switches (4096) and the longest it holds, in one file.
log "fastkd bench: the resident kernel against two_pass at V = 4096 and 8192 (timeout 60 s)"
RESIDENT_SHAPE="--n 8192 --v 4096,8192"
RESIDENT_INTERPRET=${TRITON_INTERPRET:-0}
[ "$PRESET" = smoke ] && RESIDENT_SHAPE="--n 16 --v 64 --quick" && RESIDENT_INTERPRET=1
# shellcheck disable=SC2086  # RESIDENT_SHAPE is a list of words
TRITON_INTERPRET=$RESIDENT_INTERPRET timeout -k 10 60 "$PY" -m fastkd.cli bench --preset headline --ops kd_loss \
    --divergences kl jsd $RESIDENT_SHAPE \
    --providers fastkd-triton "fastkd-triton[two_pass]" "fastkd-triton[resident]" \
    --no-plots --out "$OUT/resident_v8192" >>"$LOG" 2>&1
RESIDENT_RC=$?
(cd "$OUT" && tar -cf resident_v8192.tar resident_v8192 && rm -rf resident_v8192)

log "kernel profile: DRAM bytes, issue slots, occupancy under ncu, else timed (timeout 90 s)"
# What the model assumes and a GPU can measure (bench/profile_kernels.py): skipped in a CPU dry run.
PROFILE_RC=skipped
if [ "$PRESET" != smoke ]; then
    timeout -k 10 90 "$PY" bench/profile_kernels.py "$OUT/profile" >>"$LOG" 2>&1
    PROFILE_RC=$?
    (cd "$OUT" && tar -cf profile.tar profile && rm -rf profile)
fi

BENCH_S=$(left)
[ "$BENCH_S" -gt 400 ] && BENCH_S=400
[ "$BENCH_S" -lt 60 ] && BENCH_S=60 # (timeout 0 would mean none)
log "fastkd bench --preset $PRESET (timeout ${BENCH_S} s)"
# `fastkd bench` through this interpreter (the console script may be missing or another Python's).
# shellcheck disable=SC2086  # PRESET is a list of words
timeout -k 30 "$BENCH_S" "$PY" -m fastkd.cli bench --preset $PRESET --out "$OUT" >>"$LOG" 2>&1
BENCH_RC=$?
[ "$BENCH_RC" = 124 ] && log "bench stopped by its timeout (SIGTERM): its CSV holds the cases it finished"
[ "$BENCH_RC" = 1 ] && log "bench: a Triton kernel variant failed its check against fastkd-triton (see the log)"

log "environment record"
TESTS_RC=$TESTS_RC KERNELS_RC=$KERNELS_RC RESIDENT_RC=$RESIDENT_RC PROFILE_RC=$PROFILE_RC BENCH_RC=$BENCH_RC INSTALL_RC=$INSTALL_RC \
    WHEEL_RC=$WHEEL_RC timeout 60 "$PY" - "$OUT/env.json" <<'EOF' >>"$LOG" 2>&1
import datetime, json, os, platform, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "none"
info = {
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": os.environ.get("FASTKD_COMMIT", "unknown"),
    "exit_status": {k.lower(): os.environ[k] for k in ("WHEEL_RC", "INSTALL_RC", "TESTS_RC", "KERNELS_RC",
                                                       "RESIDENT_RC", "PROFILE_RC", "BENCH_RC")},
}
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info))
EOF

# The device tool returns at most 8 files: pack the plots if there are more.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && tar -cf plots.tar ./*.png && rm -f ./*.png)
    log "more than 8 files: plots packed into plots.tar"
fi
log "done: tests rc $TESTS_RC, kernel check rc $KERNELS_RC, resident bench rc $RESIDENT_RC, bench rc $BENCH_RC; files: $(cd "$OUT" && echo ./*)"
[ "$TESTS_RC" = 0 ] && [ "$KERNELS_RC" = 0 ] && [ "$RESIDENT_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
