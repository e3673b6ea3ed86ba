"""How CLI commands reach a datastore: the configured MongoDB URL, the running stack's embedded
server, or (when neither answers) an embedded server started just for the command."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import typer
from pymongo import AsyncMongoClient

from mindchart_cli import stack


class CommandError(ValueError):
    """Refused input; the message is printed and the command exits with status 2."""


def emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@contextlib.contextmanager
def datastore(name: str) -> Iterator[str]:
    config = stack.StackConfig.from_env()
    url = config.mongo_url(name)
    if name in config.mongo_urls or stack.mongo_answers(url):
        yield url
        return
    # The temporary server listens where the command will look for it (MINDCHART_<NAME>_DB_PORT).
    only = stack.StackConfig(data_dir=config.data_dir, host=config.host, db_ports=config.db_ports,
                             mongo_urls={other: "configured" for other in stack.SERVICES if other != name})
    runner = stack.Stack(only)
    runner.start_datastores()
    try:
        yield url
    finally:
        runner.stop()


def on_db(name: str, db_name: str, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `work(database)` against one service's datastore; refused input exits 2."""
    with datastore(name) as url:
        async def main() -> Any:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, tz_aware=True)
            try:
                return await work(client[db_name])
            finally:
                await client.close()
        try:
            return asyncio.run(main())
        except (CommandError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
