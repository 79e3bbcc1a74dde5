"""VRAdam's Triton path in CI: interpreted_vradam_triton.py under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is first imported (it decorates its own library then), and
other tests import it without the variable (torch.compile does), so the cases run once in a
subprocess; each case is reported here under its own name, with its own skip reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from interpreted_vradam_triton import CASES

from optim import vradam_triton

ROOT = Path(__file__).resolve().parents[2]
INNER = Path(__file__).with_name("interpreted_vradam_triton.py")

pytestmark = pytest.mark.skipif(not vradam_triton.available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """{case: (outcome, message)} from one interpreted run of every case."""
    report = tmp_path_factory.mktemp("triton") / "report.xml"
    xml = f"--junitxml={report}"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INNER), xml],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), proc.stdout + proc.stderr
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                message = f"{child.get('message', '')}\n{child.text or ''}"
        outcomes[case.get("name")] = (outcome, message)
    return outcomes


@pytest.mark.parametrize("case", CASES)
def test_interpreted(case: str, interpreted: dict[str, tuple[str, str]]) -> None:
    assert case in interpreted, f"{case} did not run; ran: {sorted(interpreted)}"
    outcome, message = interpreted[case]
    if outcome == "skipped":
        pytest.skip(message.strip())
    assert outcome == "passed", message
