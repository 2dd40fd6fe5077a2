#!/usr/bin/env bash
# Runs the upstream Kubernetes [Conformance] tests (e2e.test of the cluster's own 1.20.2 tree,
# build-suite.sh) against a cluster clusterctl made, offline, and writes a report: every
# conformance test passed, failed (with the cause, when it is a known limit of this machine) or
# skipped (with the reason), and the totals.
#
# usage: run.sh --cluster NAME [--set ci|full] [--focus REGEX] [--out DIR] [--timeout SECONDS]
#   --cluster NAME   the cluster (clusterctl's state: CLUSTERCTL_STATE_DIR or its default)
#   --set ci         the CI subset (tests/conformance/ci-subset.txt: pods, services, deployments,
#                    configmaps, secrets, RBAC, webhooks, ...); the default
#   --set full       every [Conformance] test of the tree (311 in 1.20.2)
#   --focus REGEX    only the conformance tests whose names match REGEX
#   --out DIR        where the junit XML, e2e.log and report.{md,json} go (default: a new dir
#                    under /var/tmp)
#   --timeout S      seconds each pass may take (default 21600: 6 h)
#   --rerun-failed   run the tests that failed once more, alone, afterwards; the report shows
#                    those that pass then as "failed, then passed when run again alone"
#   --nodes N        run the tests that may share the cluster on N ginkgo nodes at once (ginkgo
#                    -nodes), then the [Serial] ones alone (default 1: one pass, one at a time)
#   --continue DIR   go on with the run whose results are in DIR (one cut off by its timeout, a
#                    lost session, a cluster gone): only the tests of its set with no result yet
#                    run, their junit files are added beside the earlier ones, and the report covers
#                    them all (its time is the sum of the parts); its --set is DIR's
# Needs: clusterctl (CLUSTERCTL_BIN or on PATH), kubectl on PATH (the suite's kubectl tests run
# it), KUBECONFIG naming a context for the cluster (create merged one), python3.
# Exit status: 0 if no test failed for a reason the report does not explain (a known
# environment limit in known-failures.tsv), 1 otherwise, 2 on bad usage.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
here=$(cd "$(dirname "$0")" && pwd)
cluster= set=ci focus= out= timeout=21600 nodes=1 rerun= cont=
die() { printf 'conformance: %s\n' "$*" >&2; exit 2; }
log() { printf 'conformance: %s\n' "$*" >&2; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cluster) cluster=${2:?}; shift 2 ;;
    --set) set=${2:?}; shift 2 ;;
    --focus) focus=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --nodes) nodes=${2:?}; shift 2 ;;
    --rerun-failed) rerun=1; shift ;;
    --continue) cont=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$cluster" ] || die "--cluster NAME is required"
case "$set" in ci|full) ;; *) die "--set must be ci or full, not $set" ;; esac
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout takes a number of seconds, not $timeout"
case "$nodes" in [1-9]|[1-9][0-9]) ;; *) die "--nodes must be a number from 1 to 99, not $nodes" ;; esac
bin=${CLUSTERCTL_BIN:-$(command -v clusterctl || true)}
[ -x "$bin" ] || die "clusterctl not found: set CLUSTERCTL_BIN or put it on PATH"
kubectl=$(command -v kubectl) || die "kubectl not found on PATH (the suite's kubectl tests run it)"
[ -n "${KUBECONFIG:-}" ] || die "KUBECONFIG must name the kubeconfig with the cluster's context"
command -v python3 > /dev/null || die "python3 not found"
# A continued run: its directory, the earlier part's set, focus and time, and names of its own for
# this part's files (ginkgo's junit_<prefix>NN.xml) so that the earlier ones stay.
prefix= part= earlier=0
if [ -n "$cont" ]; then
  [ -z "$out" ] || [ "$out" = "$cont" ] || die "--continue DIR writes into DIR: drop --out"
  [ -f "$cont/report.json" ] && compgen -G "$cont/junit_*.xml" > /dev/null ||
    die "--continue $cont: no report.json and junit_*.xml there (the directory of an earlier run.sh)"
  mapfile -t was < <(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))["totals"]
print(t["set"], t.get("elapsedSeconds", 0), t.get("focus", ""), sep="\n")' "$cont/report.json") &&
    [ "${#was[@]}" -eq 3 ] || die "--continue $cont: report.json is not a report of run.sh"
  set=${was[0]} earlier=${was[1]} focus=${was[2]}
  out=$cont
  part=1
  while compgen -G "$out/junit_cont${part}_*.xml" > /dev/null || [ -e "$out/e2e-cont$part.log" ]; do
    part=$((part + 1))
  done
  prefix=cont${part}_
fi
out=${out:-$(mktemp -d /var/tmp/conformance.XXXXXX)}
mkdir -p "$out"

suite=$(bash "$here/build-suite.sh")
log "suite $suite"
log "loading the suite's images into every node of $cluster"
"$bin" load "$cluster" "$suite"/images/*.tar >&2

# Focus: every [Conformance] test, narrowed to the CI subset or --focus. Skip: what this machine
# cannot run (skips.tsv), each with its reason in the report.
regex_of() { grep -v '^#' "$1" | grep . | cut -f1 | paste -sd'|'; }
run_focus='\[Conformance\]'
if [ -n "$focus" ]; then
  run_focus=$focus
elif [ "$set" = ci ]; then
  # Every line must name a test of this tree: a typo would silently run nothing.
  (cd "$here" && python3 -c '
import sys, report
names = {c for _, c in report.read_conformance(sys.argv[1])}
bad = [l.rstrip("\n") for l in open("ci-subset.txt") if l.strip() and not l.startswith("#") and l.rstrip("\n") not in names]
for b in bad: print("conformance: ci-subset.txt names no [Conformance] test of this tree: " + b, file=sys.stderr)
sys.exit(1 if bad else 0)' "$suite/conformance.yaml") || exit 2
  run_focus=$(grep -v '^#' "$here/ci-subset.txt" | grep . | sed 's/[][().*+?^$|\\{}]/\\&/g' | paste -sd'|')
fi
skip=$(regex_of "$here/skips.tsv")
if [ -n "$cont" ]; then
  mapfile -t earlier_junit < <(ls "$out"/junit_*.xml)
  run_focus=$(python3 "$here/report.py" --conformance "$suite/conformance.yaml" --junit "${earlier_junit[@]}" \
    --without-result "$run_focus" --skip-re "$skip")
  log "continuing the $set run in $out (part $part): $(python3 -c 'import sys; print(len(sys.argv[1].split("|")) if sys.argv[1] else 0)' "$run_focus") test(s) have no result yet"
fi

ctx=$(kubectl config current-context)
e2e_flags=(--kubeconfig="$KUBECONFIG" --context="$ctx" --provider=skeleton
  --kubectl-path="$kubectl" --report-dir="$out" --disable-log-dump --dump-logs-on-failure=false)
ginkgo_flags() { # FOCUS SKIP: e2e.test's own ginkgo flags
  printf '%s\n' --ginkgo.focus="$1" --ginkgo.noColor --ginkgo.progress=false --ginkgo.slowSpecThreshold=120
  [ -z "$2" ] || printf '%s\n' --ginkgo.skip="$2"
}
export KUBE_TEST_REPO_LIST=$suite/repo-list.yaml
started=$(date +%s)
[ -n "$cont" ] || rm -f "$out"/junit_*.xml
log_name=e2e${part:+-cont$part}
rc=0
if [ -z "$run_focus" ]; then
  log "every test of the set has a result already: the report only"
elif [ "$nodes" -eq 1 ]; then
  log "running e2e.test (focus: ${focus:-the $set set}) against context $ctx; log: $out/$log_name.log"
  mapfile -t gf < <(ginkgo_flags "$run_focus" "$skip")
  # e2e.test itself has no timeout flag (ginkgo's CLI has): timeout(1) ends it.
  timeout --kill-after=60 "$timeout" "$suite/bin/e2e.test" "${e2e_flags[@]}" --report-prefix="$prefix" "${gf[@]}" \
    > "$out/$log_name.log" 2>&1 || rc=$?
else
  # Ginkgo runs no test alone by itself: the [Serial] ones (they take nodes down, fill them or
  # watch cluster-wide) wait for a pass of their own after the parallel one.
  serial=$(python3 "$here/report.py" --conformance "$suite/conformance.yaml" \
    --serial-of "$run_focus" --skip-re "$skip")
  log "running e2e.test on $nodes ginkgo nodes (focus: ${focus:-the $set set}; [Serial] tests after) against context $ctx; log: $out/$log_name.log"
  mapfile -t gf < <(ginkgo_flags "$run_focus" "${skip:+$skip|}\\[Serial\\]")
  # ginkgo -nodes passes every flag after the binary to each node's e2e.test, whose ginkgo flags
  # (--ginkgo.*) it reads as its own.
  "$suite/bin/ginkgo" -nodes="$nodes" -noColor -timeout="${timeout}s" "$suite/bin/e2e.test" -- \
    "${e2e_flags[@]}" --report-prefix="$prefix" "${gf[@]}" > "$out/$log_name.log" 2>&1 || rc=$?
  if [ -n "$serial" ]; then
    log "parallel pass exited $rc after $(( $(date +%s) - started )) s; the [Serial] pass; log: $out/$log_name-serial.log"
    mapfile -t gf < <(ginkgo_flags "$serial" "")
    timeout --kill-after=60 "$timeout" "$suite/bin/e2e.test" "${e2e_flags[@]}" --report-prefix="${prefix}serial" "${gf[@]}" \
      > "$out/$log_name-serial.log" 2>&1 || rc=$?
  fi
fi
log "e2e.test exited $rc after $(( $(date +%s) - started )) s"
if [ -n "$rerun" ]; then
  # This part's failures (a continued run's earlier parts had their own reruns).
  failed=$(cd "$here" && python3 -c '
import sys, xml.etree.ElementTree as ET, report
names = set()
for p in sys.argv[1:]:
    for c in ET.parse(p).getroot().iter("testcase"):
        if c.find("failure") is not None or c.find("error") is not None:
            names.add(c.get("name", ""))
print(report.alternation(sorted(n for n in names if "[Conformance]" in n)))
' $(compgen -G "$out/junit_${prefix}[0-9]*.xml"; compgen -G "$out/junit_${prefix}serial*.xml"))
  if [ -n "$failed" ]; then
    log "running the $(tr -cd '|' <<< "$failed" | wc -c | awk '{print $1 + 1}') failed test(s) again, alone; log: $out/$log_name-rerun.log"
    mapfile -t gf < <(ginkgo_flags "$failed" "")
    timeout --kill-after=60 "$timeout" "$suite/bin/e2e.test" "${e2e_flags[@]}" --report-prefix="rerun${prefix:+_$prefix}" "${gf[@]}" \
      > "$out/$log_name-rerun.log" 2>&1 || true
  fi
fi
mapfile -t junit < <(ls "$out"/junit_*.xml 2> /dev/null)
[ "${#junit[@]}" -gt 0 ] || { tail -40 "$out/$log_name.log" >&2; echo "conformance: e2e.test wrote no junit report" >&2; exit 1; }
python3 "$here/report.py" --junit "${junit[@]}" --skips "$here/skips.tsv" --known "$here/known-failures.tsv" \
  --conformance "$suite/conformance.yaml" --set "$set" ${focus:+--focus "$focus"} --out "$out" --elapsed $(( earlier + $(date +%s) - started ))
