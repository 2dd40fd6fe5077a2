# shellcheck shell=bash
# Stages with time budgets, for tests/run-all.sh (sourced, not run).
#
#   run_stage NAME BUDGET TITLE CMD...   run CMD (a command or an exported function) as stage NAME;
#                                        after a stage failed, the later ones are listed as not run
#   stage_table                          print stage | budget | seconds | result, and the totals
#   stage_reap_dead_runs                 end what killed earlier runs left behind (see below)
#   stage_teardown_beds                  tear down every test bed this run made
#   stage_interrupted                    the INT/TERM handler: end the stage, tear down, print the table
#
# Each stage runs in its own session and process group (setsid), with its output also kept in
# $run_dir/NAME.log. A stage that outlives its budget is diagnosed BEFORE anything is killed, so the
# evidence still exists: what it was waiting for (the files scripts leave in $CLUSTERCTL_DIAG_DIR,
# e.g. cli-e2e.sh's `phase:`, `waiting for:` and `state dir:` lines), the last records of every
# operation journal in those state dirs, and for each bed of this run `virsh list --all` inside the
# bed and the tail of every VM console log. Then the stage's process group gets TERM, 30 s of grace
# and KILL, every bed of this run is torn down, and the stage counts as failed.
#
# Besides its own budget every stage is cut off at the run's deadline (stage_deadline, seconds after
# run_t0; CLUSTERCTL_RUN_DEADLINE overrides it): a stage starting late gets only what is left, so a
# hang anywhere ends the run, diagnosed and torn down, inside CI's 90 minutes while one slow stage
# may still use time an earlier fast one left over. A stage cut by the deadline reports `deadline`.
#
# Budgets are overridable for experiments: CLUSTERCTL_STAGE_BUDGET_<NAME>=SECONDS (NAME upper-case).
# CLUSTERCTL_STAGES="cargo image" runs only the named stages (the others are listed as skipped).
# CLUSTERCTL_STAGE_HANG=NAME makes stage NAME hang after its work (to see the budget cut it off).
#
# The caller sets run_dir (this run's directory), run_t0 ($SECONDS at the start) and exports
# CLUSTERCTL_RUN_ID (beds made by this run carry it as BED_RUN) and CLUSTERCTL_DIAG_DIR.

run_dir=${run_dir:?tests/bed/stage.sh: set run_dir before sourcing}
run_t0=${run_t0:-$SECONDS}
# 86 min: diagnosing and killing a stage (30 s of grace), the teardown and the table fit in the 4
# minutes left of CI's 90.
stage_deadline=${CLUSTERCTL_RUN_DEADLINE:-5160}
[[ $stage_deadline =~ ^[0-9]+$ ]] || {
  echo "run-all: CLUSTERCTL_RUN_DEADLINE must be whole seconds, not '$stage_deadline'" >&2
  exit 2
}
stage_names=() stage_budgets=() stage_secs=() stage_results=() stage_current='' stage_stopped='' stage_t0=0
stage_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# The budget of stage $1 (default $2), or its CLUSTERCTL_STAGE_BUDGET_<NAME> override.
stage_budget() {
  local v=CLUSTERCTL_STAGE_BUDGET_${1^^}
  v=${v//-/_}
  echo "${!v:-$2}"
}

stage_selected() {
  [ -z "${CLUSTERCTL_STAGES:-}" ] || [[ " ${CLUSTERCTL_STAGES//,/ } " == *" $1 "* ]]
}

run_stage() {
  local name=$1 title=$3 budget
  budget=$(stage_budget "$1" "$2")
  shift 3
  stage_names+=("$name")
  stage_budgets+=("$budget")
  if [ -n "$stage_stopped" ] || ! stage_selected "$name"; then
    stage_secs+=(0)
    if [ -n "$stage_stopped" ]; then stage_results+=("not run"); else stage_results+=(skipped); fi
    return 0
  fi
  # A stage the deadline leaves no time for is not started.
  if [ $((SECONDS - run_t0)) -ge "$stage_deadline" ]; then
    echo "run-all: stage $name not started: the run's deadline of $stage_deadline s has passed" >&2
    stage_secs+=(0)
    stage_results+=(deadline)
    stage_stopped=$name
    return 0
  fi
  printf '\n==> [%s] %s (budget %s s; %s s into the run)\n' "$name" "$title" "$budget" "$((SECONDS - run_t0))"
  local log=$run_dir/$name.log pgfile=$run_dir/$name.pgid hang=''
  [ "${CLUSTERCTL_STAGE_HANG:-}" != "$name" ] || hang=1
  : > "$log"
  stage_current=$name
  stage_t0=$SECONDS
  local t0=$SECONDS
  # The session leader records its PID, which is the stage's process group ID.
  # shellcheck disable=SC2016 # expanded by the stage's shell
  setsid -w bash -c 'set -euo pipefail; echo $$ > "$0"; stage_hang=$1; shift; "$@"
    if [ -n "$stage_hang" ]; then
      echo "waiting for: nothing (a hang injected by CLUSTERCTL_STAGE_HANG)" > "$CLUSTERCTL_DIAG_DIR/hang"
      echo "stage: hanging on purpose (CLUSTERCTL_STAGE_HANG)"; sleep infinity
    fi' "$pgfile" "$hang" "$@" > >(tee -a "$log") 2>&1 &
  local pid=$! result='' end=$((run_t0 + stage_deadline)) cut="its budget of $budget s"
  # Whichever comes first: the stage's own budget or the run's deadline.
  if [ $((t0 + budget)) -gt "$end" ]; then
    echo "run-all: stage $name gets $((end - t0)) s of its $budget (the run's deadline is $stage_deadline s)"
  else
    end=$((t0 + budget))
  fi
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then
      result=timeout
      [ $((SECONDS - t0)) -ge "$budget" ] || { result=deadline; cut="the run's deadline of $stage_deadline s"; }
      break
    fi
    sleep 1
  done
  local pg
  pg=$(cat "$pgfile" 2>/dev/null || echo "$pid")
  if [ "$result" = timeout ] || [ "$result" = deadline ]; then
    stage_diagnose "$name" "$cut" "$log"
    stage_kill_group "$pg"
    wait "$pid" 2>/dev/null || true
    stage_teardown_beds
  else
    local rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -eq 0 ]; then result=ok; else result="failed (exit $rc)"; fi
    # A stage leaves nothing running behind it, and a failed one no test bed.
    if pgrep -g "$pg" > /dev/null 2>&1; then
      echo "run-all: stage $name left processes behind; ending them: $(pgrep -g "$pg" | tr '\n' ' ')"
      stage_kill_group "$pg"
    fi
    [ "$rc" -eq 0 ] || stage_teardown_beds
  fi
  stage_current=''
  stage_secs+=($((SECONDS - t0)))
  stage_results+=("$result")
  [ "$result" = ok ] || { echo "run-all: stage $name: $result" >&2; stage_stopped=$name; }
}

# TERM to the whole process group, up to 30 s of grace, then KILL.
stage_kill_group() {
  local pg=$1
  [ -n "$pg" ] || return 0
  kill -TERM -- "-$pg" 2>/dev/null || return 0
  for _ in $(seq 1 30); do
    pgrep -g "$pg" > /dev/null 2>&1 || return 0
    sleep 1
  done
  echo "run-all: process group $pg still alive after 30 s of TERM: KILL"
  kill -KILL -- "-$pg" 2>/dev/null || true
}

# The beds (state files) made by run $1 (default: this run).
stage_beds() {
  local id=${1:-$CLUSTERCTL_RUN_ID} f
  for f in /run/clusterctl-bed*/current; do
    [ -f "$f" ] || continue
    # shellcheck disable=SC1090
    [ "$(. "$f"; echo "${BED_RUN:-}")" = "$id" ] && echo "$f"
  done
  return 0
}

# The last records of every operation journal under state dir $1. A script inside a bed names
# the directory as the bed sees it, so it is read through each bed's mount namespace too.
stage_journals() {
  local d=$1 f holder bed
  # shellcheck disable=SC2016 # expanded by the inner shell
  local show='find "$0" -maxdepth 3 -name "journal*.jsonl" 2>/dev/null | sort | while IFS= read -r j; do
      echo "--- last journal records: $j"; tail -n 20 "$j"; done'
  if [ -d "$d" ]; then
    sh -c "$show" "$d"
    return
  fi
  for f in $(stage_beds); do
    # shellcheck disable=SC1090
    read -r bed holder < <(. "$f"; echo "${BED_NAME:-?} ${BED_HOLDER:-0}")
    if [ "$holder" = 0 ] || ! kill -0 "$holder" 2>/dev/null; then continue; fi
    echo "--- (state dir $d as seen inside bed $bed)"
    timeout 20 nsenter --target "$holder" --mount -- sh -c "$show" "$d" || true
  done
}

stage_diagnose() {
  local name=$1 cut=$2 log=$3 f d
  echo
  echo "!!! stage $name was stopped by $cut; what it was doing (nothing killed yet):"
  echo "--- last 20 lines of its output ($log)"
  tail -n 20 "$log"
  for f in "$CLUSTERCTL_DIAG_DIR"/*; do
    [ -f "$f" ] || continue
    echo "--- waiting for (${f}):"
    head -n 50 "$f"
    while IFS= read -r d; do
      stage_journals "$d"
    done < <(sed -n 's/^state dir: *//p' "$f")
  done
  local beds
  beds=$(stage_beds)
  [ -n "$beds" ] || echo "--- no test bed of this run is up"
  for f in $beds; do
    (
      BED_NAME='' BED_DIR='' BED_HOLDER=''
      # shellcheck disable=SC1090
      . "$f"
      echo "--- bed $BED_NAME ($f): virsh list --all"
      if [ -n "$BED_HOLDER" ] && kill -0 "$BED_HOLDER" 2>/dev/null; then
        local domains rc=0
        domains=$(timeout 20 nsenter --target "$BED_HOLDER" --mount --net -- virsh -q -c qemu:///system list --all 2>&1) || rc=$?
        echo "${domains:-(no domains)}"
        [ "$rc" -eq 0 ] || echo "(virsh failed or took over 20 s: exit $rc)"
      else
        echo "(the bed's holder is gone)"
      fi
      # What each VM printed on its serial console, then the end of QEMU's own log (its command
      # line left out: how it ended, e.g. killed or crashed).
      for c in "$BED_DIR"/var/log/libvirt/qemu/*console*.log; do
        [ -s "$c" ] || continue
        echo "--- last 40 lines of $c"
        tail -n 40 "$c"
      done
      for c in "$BED_DIR"/var/log/libvirt/qemu/*.log; do
        case "$c" in *console*.log) continue ;; esac
        [ -s "$c" ] || continue
        echo "--- end of $c"
        grep -v -e ' \\$' -e '^-' "$c" | tail -n 5
      done
    )
  done
  echo "!!! end of diagnostics for stage $name; ending its process group and tearing down its beds"
}

stage_teardown_beds() {
  local f root
  for f in $(stage_beds "$@"); do
    root=$(dirname "$f")
    CLUSTERCTL_BED_STATE_ROOT=$root bash "$stage_repo/tests/bed/libvirt-env.sh" down || true
    case "$root" in /run/clusterctl-bed-ci-*) rmdir "$root" 2>/dev/null || true ;; esac
  done
  # This run's own state root, also when its bed was already torn down by the stage itself.
  case "${CLUSTERCTL_BED_STATE_ROOT:-}" in /run/clusterctl-bed-ci-*) rmdir "$CLUSTERCTL_BED_STATE_ROOT" 2>/dev/null || true ;; esac
}

# The start time of process $1 (field 22 of /proc/PID/stat), empty if it is gone or a zombie: a
# PID plus its start time names one process for good, even after the PID is reused.
stage_start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  # shellcheck disable=SC2086 # split into fields
  set -- $stat
  [ "$1" = Z ] || echo "${20}"
}

# Records this run for stage_reap_dead_runs of later runs.
stage_register_run() {
  printf 'pid=%s\nstarted=%s\nid=%s\n' "$$" "$(stage_start_time $$)" "$CLUSTERCTL_RUN_ID" > "$run_dir/run"
}

# A run killed with SIGKILL cannot clean up: its stage may still be running in its own process
# group, its beds still up. Each run leaves /run/clusterctl-ci/<pid>/run (its PID, start time and
# ID); a run whose process is gone is dead: end its stage's process group (if that group still
# runs with that run's ID in its environment), tear down its beds, and reap any bed whose holder is
# gone at any state root (libvirt-env.sh reap: only dead beds, so a concurrent run is safe).
stage_reap_dead_runs() {
  local d pid started id pg f
  for d in /run/clusterctl-ci/*/; do
    [ -f "$d/run" ] || continue
    pid='' started='' id=''
    # shellcheck disable=SC1091
    . "$d/run"
    [ "$id" != "$CLUSTERCTL_RUN_ID" ] || continue
    if [ -n "$pid" ] && [ "$(stage_start_time "$pid")" = "$started" ]; then
      continue   # that run is alive
    fi
    echo "run-all: reaping run $id (pid $pid gone)"
    for f in "$d"/*.pgid; do
      [ -f "$f" ] || continue
      pg=$(cat "$f")
      if tr '\0' '\n' 2>/dev/null < "/proc/$pg/environ" | grep -qxF "CLUSTERCTL_RUN_ID=$id"; then
        echo "run-all: ending stage $(basename "$f" .pgid) of run $id (process group $pg)"
        stage_kill_group "$pg"
      fi
    done
    stage_teardown_beds "$id"
    rm -rf "$d"
  done
  for f in /run/clusterctl-bed*/current; do
    [ -f "$f" ] || continue
    CLUSTERCTL_BED_STATE_ROOT=$(dirname "$f") bash "$stage_repo/tests/bed/libvirt-env.sh" reap || true
  done
  for d in /run/clusterctl-bed-ci-*/; do
    if [ -d "$d" ]; then rmdir "$d" 2>/dev/null || true; fi
  done
}

# On INT/TERM (CI cancel, Ctrl-C): end the current stage, tear down this run's beds, print the table.
stage_interrupted() {
  trap - INT TERM
  echo "run-all: interrupted; ending the current stage and tearing down this run's beds" >&2
  if [ -n "$stage_current" ]; then
    stage_kill_group "$(cat "$run_dir/$stage_current.pgid" 2>/dev/null)"
    stage_secs+=($((SECONDS - stage_t0)))
    stage_results+=(interrupted)
    stage_stopped=$stage_current
  fi
  stage_teardown_beds
  stage_table
  exit 130
}

stage_table() {
  local i total_b=0 total_s=0 overall=passed
  printf '\n%-10s %8s %8s  %s\n' stage budget seconds result
  for i in "${!stage_names[@]}"; do
    printf '%-10s %8s %8s  %s\n' "${stage_names[$i]}" "${stage_budgets[$i]}" "${stage_secs[$i]}" "${stage_results[$i]}"
    total_b=$((total_b + stage_budgets[i]))
    total_s=$((total_s + stage_secs[i]))
    case "${stage_results[$i]}" in ok | skipped | "not run") ;; *) overall=FAILED ;; esac
  done
  printf '%-10s %8s %8s  %s (deadline %d min, run %d min %02d s)\n' total "$total_b" "$total_s" "$overall" \
    $((stage_deadline / 60)) $((total_s / 60)) $((total_s % 60))
}
