"""Rendering: one Jinja2 environment with autoescaping on for every template, and the small
page helpers every route uses (the signed-in header, messages, 404)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader
from starlette.requests import Request
from starlette.responses import HTMLResponse


class TooLarge(Exception):
    """A form post without a length, or over MINDCHART_WORKSPACE_MAX_BODY_BYTES: 413."""


class NotFoundPage(Exception):
    """Answer 404 without saying whether the thing exists (the same page for both)."""


def environment(folder: Path) -> Environment:
    env = Environment(loader=FileSystemLoader(folder), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    return env


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env: Environment = request.app.state.templates
    context.setdefault("user", None)
    context.setdefault("csrf", "")
    html = env.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status)


def message(request: Request, title: str, text: str, status: int = 200, **context: Any) -> HTMLResponse:
    return render(request, "message.html", status=status, title=title, text=text, **context)
