"""GET /dashboard: the admin's page (dashboard.html, one file of HTML, CSS and JavaScript). The page needs no key;
the data it reads (/admin/stats, /admin/history) does, and the page asks for it."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

PAGE = (Path(__file__).parent / "dashboard.html").read_text()


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _policy(page: str) -> str:
    """Only this page's own inline script and style run (by hash), and it talks only to its own origin."""
    scripts = " ".join(_hash(s) for s in re.findall(r"<script>(.*?)</script>", page, re.S))
    styles = " ".join(_hash(s) for s in re.findall(r"<style>(.*?)</style>", page, re.S))
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


HEADERS = {"Content-Security-Policy": _policy(PAGE), "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def dashboard(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE, headers=HEADERS)


def routes() -> list[Route]:
    return [Route("/dashboard", dashboard, methods=["GET"])]
