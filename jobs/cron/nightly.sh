#!/bin/bash
# Nightly classification from cron: tonight's run goes into its own dated partition, two runs never overlap, and
# by default each night is incremental: it classifies only the files new or changed since the last finished night
# and gives each file deleted since then a `deleted` row (docs/operations.md "Incremental nights").
#
#   jobs/cron/nightly.sh INPUT OUTPUT [classify options]
#   INCREMENTAL=0 jobs/cron/nightly.sh INPUT OUTPUT ...    every night classifies every file instead
#
# crontab line (02:15 every night; cron mails nothing, the log has everything):
#   15 2 * * * /path/to/repo/jobs/cron/nightly.sh /data/images /data/labels --weights imagenet >/dev/null 2>&1
#
# - Output: OUTPUT/run_date=YYYY-MM-DD/, the date taken once when the script starts (a run that goes past
#   midnight stays in its night). RUN_DATE=2024-05-01 nightly.sh ... redoes or resumes that night instead.
# - Overlap: the script holds an flock on OUTPUT/_locks/nightly.lock while it runs; a run started while the
#   previous one still holds it exits 73 at once without touching anything.
# - Log: LOG_DIR/nightly-YYYY-MM-DD.log (LOG_DIR defaults to OUTPUT/_logs; a leading '_' keeps warehouse
#   readers out), appended to by every attempt of that night.
# - Exit code: the job's (0 done, 1 failed, 2 bad input/options, 73 OUTPUT locked, 74 disk full, 75 interrupted:
#   rerun with RUN_DATE=that date to resume; README "Exit codes").
# - Python: $PYTHON if set, else the .venv of the repository this script is in (`make install`).
set -u
if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT OUTPUT [classify options]" >&2
    exit 2
fi
input=$1 output=$2
shift 2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
run_date=${RUN_DATE:-$(date +%F)}
log_dir=${LOG_DIR:-$output/_logs}
log=$log_dir/nightly-$run_date.log
lock=$output/_locks/nightly.lock

mkdir -p "$log_dir" "$output/_locks" || exit 2
exec 9>>"$lock"
if ! flock --nonblock 9; then
    echo "$(date -Is) another nightly run holds $lock: not starting (exit 73)" >>"$log"
    exit 73
fi
if [ ! -x "$python" ]; then
    echo "$(date -Is) no Python at $python: run 'make install' in $repo, or set PYTHON" >>"$log"
    exit 2
fi

incremental=()
if [ "${INCREMENTAL:-1}" != 0 ]; then
    incremental=(--incremental)
fi

echo "$(date -Is) nightly run $run_date: $python -m pipeline classify $input $output --partition run_date=$run_date ${incremental[*]} $*" >>"$log"
# exec: Python gets cron's or a person's signals directly, and its exit code is this script's
exec "$python" -m pipeline classify "$input" "$output" --partition "run_date=$run_date" "${incremental[@]}" \
    --progress log "$@" >>"$log" 2>&1
