"""Write tests/durations.json, each test file's seconds, from a run's JUnit report.

    python scripts/test-durations.py build/test-results/junit.xml

``make pytest`` writes that report; tests/infra/longestfirst.py reads the table to hand
the longest files to xdist's workers first. Run this after a change moves a file's time
by much (the table only balances the workers: a stale one never drops a test).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "durations.json"


def test_file(classname: str) -> str | None:
    """``tests.e2e.test_x.TestCase`` -> ``tests/e2e/test_x.py``: the longest prefix that is
    a file (a class name may follow the module's)."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end]) + ".py"
        if (ROOT / candidate).is_file():
            return candidate
    return None


def main(report: str) -> int:
    seconds: defaultdict[str, float] = defaultdict(float)
    # The report is this suite's own, written by pytest on this machine.
    for case in ET.parse(report).iter("testcase"):  # noqa: S314
        file = test_file(case.get("classname", ""))
        if file is not None:
            seconds[file] += float(case.get("time", "0"))
    table = {file: round(total, 1) for file, total in sorted(seconds.items())}
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{TABLE.relative_to(ROOT)}: {len(table)} files, {sum(table.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} JUNIT_XML")
    sys.exit(main(sys.argv[1]))
