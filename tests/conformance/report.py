#!/usr/bin/env python3
"""The conformance report: e2e.test's junit XML read against the tree's list of [Conformance]
tests (test/conformance/testdata/conformance.yaml), the reasons tests are skipped here
(skips.tsv) and the known causes of failures on this machine (known-failures.tsv).

Writes report.md and report.json to --out and prints the totals. Exit status 1 if a test failed
for a cause the report does not explain, or a test of the set never ran; 0 otherwise.
Standard library only (a fresh machine has no PyYAML): conformance.yaml is read with a reader
for the shape that file has (a list of mappings whose values are plain or single-quoted
scalars folded over indented lines).
"""

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET


def read_conformance(path):
    """[(testname, codename)] from conformance.yaml."""
    tests, cur, key, buf = [], {}, None, []

    def flush():
        nonlocal key, buf
        if key is not None:
            text = " ".join(s.strip() for s in buf).strip()
            if text.startswith("'") and text.endswith("'"):
                text = text[1:-1].replace("''", "'")
            cur[key] = text
        key, buf = None, []

    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        m = re.match(r"^(- |  )([a-z]+): ?(.*)$", line)
        if m:
            flush()
            if m.group(1) == "- ":
                if cur:
                    tests.append(cur)
                cur = {}
            key, buf = m.group(2), [m.group(3)]
        elif line.startswith("    "):
            buf.append(line)
    flush()
    if cur:
        tests.append(cur)
    return [(t["testname"], t["codename"]) for t in tests]


def read_rules(path):
    """[(compiled regex, text)] from a tab-separated file; '#' lines are comments."""
    rules = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            sys.exit(f"{path}:{n}: expected REGEX<TAB>TEXT")
        rx, text = line.split("\t", 1)
        rules.append((re.compile(rx), text.strip()))
    return rules


def first(rules, name):
    for rx, text in rules:
        if rx.search(name):
            return text
    return None


def first_line(msg):
    """The failure's first line that says something (ginkgo puts the code location first)."""
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    said = [l for l in lines if not re.match(r"^\S+\.go:\d+$", l)]
    return (said or lines or [""])[0][:300]


def alternation(names):
    """A regular expression matching exactly these test names: each escaped, joined with |."""
    return "|".join(re.sub(r"([][().*+?^$|\\{}])", r"\\\1", n) for n in names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--junit", nargs="+", default=[],
                    help="junit XML files (a parallel run writes one per ginkgo node)")
    ap.add_argument("--skips")
    ap.add_argument("--known")
    ap.add_argument("--conformance", required=True)
    ap.add_argument("--set")
    ap.add_argument("--focus", default="", help="the run's --focus, kept in the report (run.sh --continue)")
    ap.add_argument("--out")
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--serial-of", metavar="FOCUS",
                    help="print, escaped and joined with |, the [Serial] conformance tests whose "
                         "names match FOCUS and not --skip-re, and exit (run.sh's serial pass)")
    ap.add_argument("--skip-re", default="")
    ap.add_argument("--without-result", metavar="FOCUS",
                    help="print, escaped and joined with |, the conformance tests whose names match "
                         "FOCUS and not --skip-re that no --junit file reports as passed or failed, "
                         "and exit (run.sh --continue)")
    a = ap.parse_args()

    conformance = read_conformance(a.conformance)
    if a.serial_of is not None:
        focus, skip = re.compile(a.serial_of), re.compile(a.skip_re) if a.skip_re else None
        names = [c for _, c in conformance if "[Serial]" in c and focus.search(c)
                 and not (skip and skip.search(c))]
        print(alternation(names))
        return 0
    if a.without_result is not None:
        focus, skip = re.compile(a.without_result), re.compile(a.skip_re) if a.skip_re else None
        done = set()
        for path in a.junit:
            for case in ET.parse(path).getroot().iter("testcase"):
                if case.find("skipped") is None:
                    done.add(case.get("name", ""))
        names = [c for _, c in conformance if focus.search(c) and not (skip and skip.search(c))
                 and c not in done]
        print(alternation(names))
        return 0
    if not (a.junit and a.skips and a.known and a.set and a.out):
        ap.error("--junit, --skips, --known, --set and --out are required")
    skips, known = read_rules(a.skips), read_rules(a.known)
    # A test is in every node's file of a parallel run (skipped where another node ran it), and
    # the serial pass's files list the parallel pass's tests as skipped: a result beats a skip.
    rank = {"skipped": 0, "passed": 1, "failed": 2}
    ran = {}
    # junit_rerun*.xml: run.sh --rerun-failed ran the failed tests again, alone. A test that
    # passes there is reported as passed on a rerun, with its first failure, never as passed.
    rerun = {}
    for path in [p for p in a.junit if "junit_rerun" in p]:
        for case in ET.parse(path).getroot().iter("testcase"):
            if case.find("skipped") is None:
                failed = case.find("failure") is not None or case.find("error") is not None
                rerun[case.get("name", "")] = "failed" if failed else "passed"
    for path in [p for p in a.junit if "junit_rerun" not in p]:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = case.get("name", "")
            if "[Conformance]" not in name:
                continue
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            skipped = case.find("skipped") is not None
            if failure is not None:
                msg = (failure.get("message") or failure.text or "").strip()
                result = ("failed", msg, float(case.get("time", 0)))
            elif skipped:
                result = ("skipped", "", 0.0)
            else:
                result = ("passed", "", float(case.get("time", 0)))
            if name not in ran or rank[result[0]] > rank[ran[name][0]]:
                ran[name] = result

    rows = []
    for testname, codename in conformance:
        status, msg, secs = ran.get(codename, ("missing", "", 0.0))
        reason = ""
        # run.sh hands skips.tsv to --ginkgo.skip: such a test never runs, whether or not an
        # interrupted run got as far as reporting it.
        if status == "missing" and first(skips, codename) is not None:
            status = "skipped"
        if status == "skipped":
            reason = first(skips, codename)
            if reason is None:
                reason = ("not in this run's set" if a.set != "full"
                          else "[Serial]: not run in the parallel pass (the serial pass runs it)"
                          if "[Serial]" in codename else "skipped by e2e.test itself")
                status = "not-run"
        elif status == "failed" and rerun.get(codename) == "passed":
            status = "passed-on-rerun"
            reason = "failed in the run, passed when run again alone"
            cause = first(known, codename)
            if cause is not None:
                reason += f"; why it failed in the run: {cause}"
        elif status == "failed":
            cause = first(known, codename)
            if cause is not None:
                reason = cause
                status = "failed-explained"
        rows.append({"test": codename, "testname": testname, "status": status,
                     "seconds": round(secs, 1), "reason": reason,
                     "message": first_line(msg)})

    count = lambda s: sum(1 for r in rows if r["status"] == s)
    totals = {
        "conformanceTests": len(conformance),
        "passed": count("passed"),
        "passedOnRerun": count("passed-on-rerun"),
        "failedExplained": count("failed-explained"),
        "failedUnexplained": count("failed"),
        "skipped": count("skipped"),
        "notRun": count("not-run"),
        "missing": count("missing"),
        "set": a.set,
        "focus": a.focus,
        "elapsedSeconds": a.elapsed,
    }
    with open(f"{a.out}/report.json", "w", encoding="utf-8") as f:
        json.dump({"totals": totals, "tests": rows}, f, indent=1)

    reasons = {}
    for r in rows:
        if r["status"] == "skipped":
            reasons.setdefault(r["reason"], []).append(r["test"])
    with open(f"{a.out}/report.md", "w", encoding="utf-8") as f:
        t = totals
        ran_n = t["passed"] + t["passedOnRerun"] + t["failedExplained"] + t["failedUnexplained"]
        f.write(f"# Conformance report ({a.set} set)\n\n")
        f.write(f"Of the {t['conformanceTests']} [Conformance] tests of Kubernetes 1.20.2: "
                f"{ran_n} ran, {t['passed']} passed, "
                + (f"{t['passedOnRerun']} failed and then passed when run again alone, " if t["passedOnRerun"] else "")
                + f"{t['failedUnexplained'] + t['failedExplained']} failed "
                f"({t['failedExplained']} explained as limits of this machine), {t['skipped']} skipped "
                f"with a reason, {t['notRun']} not in this set"
                + (f", {t['missing']} missing from the results" if t["missing"] else "")
                + f"; {a.elapsed} s.\n\n")
        for title, status in (("Failed, unexplained", "failed"), ("Failed, explained", "failed-explained"),
                              ("Failed, then passed when run again alone", "passed-on-rerun")):
            sel = [r for r in rows if r["status"] == status]
            if sel:
                f.write(f"## {title} ({len(sel)})\n\n")
                for r in sel:
                    f.write(f"- {r['test']}\n  - {r['reason'] or r['message']}\n")
                    if r["reason"] and r["message"]:
                        f.write(f"  - first failure: {r['message']}\n")
                f.write("\n")
        if reasons:
            f.write(f"## Skipped ({t['skipped']})\n\n")
            for reason, tests in reasons.items():
                f.write(f"- {reason} ({len(tests)}):\n")
                for test in tests:
                    f.write(f"  - {test}\n")
            f.write("\n")
        f.write(f"## Passed ({t['passed']})\n\n")
        for r in rows:
            if r["status"] == "passed":
                f.write(f"- {r['test']} ({r['seconds']} s)\n")
        miss = [r for r in rows if r["status"] == "missing"]
        if miss:
            f.write(f"\n## Missing from the results ({len(miss)})\n\n")
            for r in miss:
                f.write(f"- {r['test']}\n")
    print(json.dumps(totals))
    bad = totals["failedUnexplained"] + totals["missing"]
    for r in rows:
        if r["status"] in ("failed", "missing"):
            print(f"{r['status'].upper()}: {r['test']}: {r['message']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
