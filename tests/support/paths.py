"""Where things are in the checkout, for tests and the bench."""

import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
#: Screenshots and logs the suite keeps for a person to look at (ignored by git).
ARTIFACTS: Final = ROOT / "tests" / "artifacts"


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the checkout, its output captured as text; the
    caller checks the return code (a hang fails at ``timeout``)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
