"""What the gateway's `key` and psychnotes' key commands share: a new key-encryption-key file,
and a key file that is missing, malformed or refused reported as `error: ...` with exit status 2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from mindchart_cli.datastores import emit
from mindchart_core import keyfiles


@contextmanager
def key_file_errors() -> Iterator[None]:
    """A key file error in the block: its message on stderr and exit status 2."""
    try:
        yield
    except keyfiles.KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def new_kek(out: Path, kek_id: Callable[[bytes], str]) -> None:
    """Create the KEK file `out` (mode 0600, base64 of 32 random bytes on one line; refused if
    it exists) and print it with its id as the service names KEKs (`kek_id`)."""
    with key_file_errors():
        kek = keyfiles.new_kek_file(out)
    emit({"file": str(out), "kek": kek_id(kek)})
