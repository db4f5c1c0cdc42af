"""The test suite's own plumbing (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_skips_in_async_tests_keep_their_reason(tmp_path: Path) -> None:
    # regression: pytest-trio re-raised skips without their reason, so `pytest -ra`
    # printed a bare "Skipped" pointing into pytest's own code
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "test_skipping.py").write_text(
        "import pytest\n\n\nasync def test_it() -> None:\n    pytest.skip('no frobnicator here')\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "1 skipped" in r.stdout, r.stdout + r.stderr
    assert "SKIPPED [1] test_skipping.py:5: no frobnicator here" in r.stdout, r.stdout
