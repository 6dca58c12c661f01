"""The table of coach-facing sentences in docs/wording.md, read for the tests that
check each row against the code that writes it."""

from __future__ import annotations

import re

from tests.support import paths

WORDING_DOC = paths.ROOT / "docs" / "wording.md"

_ROW = re.compile(r"^\|\s*(?P<where>[^|]+?)\s*\|\s*(?P<when>[^|]+?)\s*\|\s*`(?P<text>[^`]+)`\s*\|$")


def sentences(where_prefix: str) -> list[str]:
    """The sentences of the rows whose "Where" starts with ``where_prefix``."""
    found = []
    for line in WORDING_DOC.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line.strip())
        if match and match["where"].startswith(where_prefix):
            found.append(match["text"])
    return found
