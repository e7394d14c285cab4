#!/usr/bin/env bash
# Soak and fault injection against `vvu serve blk` (scripts/soak.py says what it does).
#   scripts/soak.sh              ten minutes
#   scripts/soak.sh 3600         an hour
#   scripts/soak.sh --short      the CI variant (30 s of sessions, under a minute in all)
# Extra arguments go to soak.py (--seed N to repeat a run, --shrink once issue 11 part 1 is in).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [ "${1:-}" = "--short" ]; then
    shift
    exec nice -n 10 python scripts/soak.py --short --seconds 30 "$@"
fi
seconds=600
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi
exec nice -n 10 python scripts/soak.py --seconds "$seconds" "$@"
