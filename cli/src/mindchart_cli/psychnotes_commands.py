"""`mindchart psychnotes ...`: operations on the psychotherapy-notes vault."""

from __future__ import annotations

import typer

psychnotes_app = typer.Typer(help="The psychotherapy-notes vault", no_args_is_help=True)
