"""Step 1: the tests marked ``gpu`` (``pytest -m gpu``), in a subprocess, read back from their JUnit XML.

Only the test files that use the marker are collected (``pytest.mark.gpu`` in their text), so the other modules'
imports cost nothing and cannot break the run; collection errors do not stop the others either
(``--continue-on-collection-errors``). Without CUDA they all skip, which is the expected outcome of the CPU mode.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .config import JUNIT_FILE
from .report import Context, check, run_logged


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failing / erroring test ids of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad, skipped_reasons = [], set()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                bad.append(
                    {
                        "test": test_id,
                        "kind": tag,
                        "message": (el.get("message") or "").splitlines()[0][:300] if el.get("message") else "",
                    }
                )
        for el in case.findall("skipped"):
            skipped_reasons.add((el.get("message") or "")[:120])
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "problems": bad, "skip_reasons": sorted(skipped_reasons)}


def gpu_test_files(tests: Path) -> list[Path]:
    return sorted(p for p in tests.glob("test_*.py") if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def run_tests_check(ctx: Context) -> dict[str, Any]:
    tests = Path(ctx.cfg.tests_dir)
    if not tests.is_dir():
        return {
            "status": "skipped",
            "reason": f"no {tests}/ here: run the check from the repository root",
            "checks": [check("tests/ran", None, f"no {tests}/ directory")],
        }
    files = gpu_test_files(tests)
    if not files:
        return {"status": "failed", "checks": [check("tests/ran", False, f"no test file in {tests}/ uses mark.gpu")]}
    junit = ctx.out / JUNIT_FILE
    junit.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *map(str, files),
        "-m",
        "gpu",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
    ]
    ctx.say(f"tests: pytest -m gpu ({tests}/)")
    run = run_logged(cmd, ctx, timeout_s=ctx.subprocess_timeout())
    result: dict[str, Any] = {"command": cmd, **run, "junit": junit.name}
    if not junit.is_file():
        why = "timed out" if run["timed_out"] else f"pytest exited {run['rc']} without a report"
        result.update(status="failed", checks=[check("tests/ran", False, why)])
        return result
    summary = junit_summary(junit)
    result["summary"] = summary
    ok = summary["failures"] == 0 and summary["errors"] == 0 and not run["timed_out"] and run["rc"] in (0, 5)
    detail = (
        f"{summary['passed']} passed, {summary['failures']} failed, {summary['errors']} errors, "
        f"{summary['skipped']} skipped"
    )
    checks = [
        check(
            "tests/gpu tests pass",
            ok,
            detail + "".join(f"; {p['test']}: {p['message']}" for p in summary["problems"][:5]),
        )
    ]
    if ctx.device == "cuda":  # on a GPU they must really run, not skip
        checks.append(
            check("tests/gpu tests ran on the GPU", summary["passed"] > 0 and summary["skipped"] == 0, detail)
        )
    result.update(status="ok" if all(c["ok"] is not False for c in checks) else "failed", checks=checks)
    return result
