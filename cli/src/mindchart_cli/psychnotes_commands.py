"""`mindchart psychnotes ...`: operations on the psychotherapy-notes vault's keys.

`new-kek` writes a fresh key-encryption key file (0600); `rotate-key` re-wraps every note and
authorization data key under a new KEK without decrypting any note (psychnotes/rotation.py has the
procedure). Old KEKs come from the psychnotes configuration (KEK_FILE, PREVIOUS_KEK_FILES, or the
development key under the data dir) plus any `--old-kek-file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mindchart_cli import kek_files
from mindchart_cli.datastores import CommandError, emit, on_db
from psychnotes import keys, rotation
from psychnotes.settings import PsychnotesSettings

psychnotes_app = typer.Typer(help="The psychotherapy-notes vault", no_args_is_help=True)


@psychnotes_app.command("new-kek")
def new_kek(out: Annotated[Path, typer.Option(help="file to create (mode 0600)")]) -> None:
    """Create a new key-encryption key file: base64 of 32 random bytes on one line."""
    kek_files.new_kek(out, keys.kek_id)


@psychnotes_app.command("rotate-key")
def rotate_key(
    new_kek_file: Annotated[Path, typer.Option(help="the new KEK (base64 of 32 bytes)")],
    old_kek_file: Annotated[list[Path], typer.Option(help="more retired KEKs")] = [],  # noqa: B006
) -> None:
    """Re-wrap every data key under the new KEK (note ciphertexts are not touched)."""
    settings = PsychnotesSettings()
    with kek_files.key_file_errors():
        new = keys.read_kek(new_kek_file)
        known: dict[str, bytes] = {}
        current = keys.current_kek_path(settings)
        for path in [current, *settings.previous_kek_paths(), *old_kek_file]:
            if path.exists():
                old = keys.read_kek(path)
                known[keys.kek_id(old)] = old
    keyring = keys.Keyring(current_id=keys.kek_id(new), keks={**known, keys.kek_id(new): new})

    async def work(db: object) -> object:
        result = await rotation.rewrap_all(db, keyring)  # type: ignore[arg-type]
        if result["not_rewrapped_unknown_kek"]:
            raise CommandError(f"some data keys use KEKs not given: {result}")
        return result

    emit(on_db("psychnotes", settings.db_name, work))
