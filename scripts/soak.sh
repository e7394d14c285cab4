#!/usr/bin/env bash
# Soak and fault injection against `vvu serve blk` (scripts/soak.py says what it does).
#   scripts/soak.sh              ten minutes
#   scripts/soak.sh 3600         an hour
#   scripts/soak.sh --short      the CI variant (30 s of sessions, under a minute in all)
# Front-ends that shrink their memory file under the back-end are always among the sessions
# (--shrink). Extra arguments go to soak.py (--seed N to repeat a run, --vvu through the device).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [ "${1:-}" = "--short" ]; then
    shift
    exec nice -n 10 python scripts/soak.py --short --seconds 30 --shrink "$@"
fi
seconds=600
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi
exec nice -n 10 python scripts/soak.py --seconds "$seconds" --shrink "$@"
