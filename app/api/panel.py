"""The coaches' "AI Usage" settings panel: one HTML page and its static assets.

The page holds no credit rules: it reads usage and costs from the public API with
``fetch`` and runs actions through reserve/commit/refund like any other client, so it
doubles as a reference for the coaching app's front end.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from typing import Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app import domain

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"

#: Scripts and styles come only from this origin and the page talks only to it; the
#: referrer is withheld so nothing in the address leaks to other sites.
PAGE_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

_INVALID_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>AI Usage · Settings</title>
  <link rel="stylesheet" href="../static/panel.css">
</head>
<body>
  <main class="panel">
    <section class="card">
      <h1>AI Usage</h1>
      <p class="lead" id="invalid-coach">This settings link doesn't point to a coach.
      Please open AI Usage from the coaching app.</p>
    </section>
  </main>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


@cache
def _panel_template() -> str:
    return (STATIC_DIR / "panel.html").read_text(encoding="utf-8")


@router.get("/settings/{coach_id}", response_class=HTMLResponse)
async def settings_panel(coach_id: str) -> HTMLResponse:
    # A person follows this link in a browser, so a bad id gets a readable page; the
    # status stays 422, as on the API, for anything that checks it.
    if not domain.is_valid_coach_id(coach_id):
        return HTMLResponse(_INVALID_PAGE, status_code=422, headers=PAGE_HEADERS)
    page = _panel_template().replace("{{coach_id}}", html.escape(coach_id, quote=True))
    return HTMLResponse(page, headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR / "assets"), name="static")
