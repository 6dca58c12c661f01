"""Where things are in the checkout, for tests and the bench."""

from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
#: Screenshots and logs the suite keeps for a person to look at (ignored by git).
ARTIFACTS: Final = ROOT / "tests" / "artifacts"
