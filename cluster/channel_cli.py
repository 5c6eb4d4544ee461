"""`paycluster channel ...`: run and operate the acquirer simulator (`channel/`).

`start` launches it in the background through `cluster.servers.start_channel` (files under
`<data dir>/channel/`) and records its pid and addresses in `channel.json` there; the other
commands find it through that file and its `secrets.json` (the keys never appear on the
terminal); `stop` ends it by that pid, never by name.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from channel.client import ChannelAdmin, ChannelClient, ChannelError
from cluster.cli_options import DEFAULT_DATA_DIR
from cluster.servers import ServerStartError, start_channel, stop_pid

channel_app = typer.Typer(help="Run and operate the acquirer simulator: faults, outages, "
                               "statements.", no_args_is_help=True)

STATE_FILE = "channel.json"

DataDirOpt = Annotated[Path, typer.Option(
    "--data-dir", "-d", help="the lab's data dir; the channel lives in <data dir>/channel")]
Probability = Annotated[float | None, typer.Option(min=0.0, max=1.0)]


class OutageMode(StrEnum):
    """How the merchant API is down (channel.client.ChannelAdmin.down)."""

    refuse = "refuse"
    reset = "reset"
    unavailable = "503"


def _folder(data_dir: Path) -> Path:
    return (data_dir / "channel").resolve()


def _state(data_dir: Path) -> dict[str, Any]:
    """channel.json and the keys of the running channel; exits 1 if there is none."""
    folder = _folder(data_dir)
    try:
        state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
        keys: dict[str, str] = json.loads((folder / "secrets.json").read_text())
    except (OSError, ValueError):
        typer.echo(f"no channel in {folder}: run `paycluster channel start` first", err=True)
        raise typer.Exit(1) from None
    return {**state, **keys}


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ChannelError as exc:
        typer.echo(f"channel: {exc}", err=True)
        raise typer.Exit(1) from None


@channel_app.command()
def start(data_dir: DataDirOpt = DEFAULT_DATA_DIR,
          port: Annotated[int | None, typer.Option(help="merchant API port")] = None,
          admin_port: Annotated[int | None, typer.Option(help="admin API port")] = None,
          ) -> None:
    """Start the channel in the background (127.0.0.1, free ports unless given)."""
    folder = _folder(data_dir)
    try:
        server = start_channel(folder, port, admin_port)
    except ServerStartError as exc:
        typer.echo(f"channel did not start: {exc}", err=True)
        raise typer.Exit(1) from None
    record = {**server.to_json(), "started_at": psutil.Process(server.pid).create_time()}
    (folder / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(json.dumps({"url": server.url, "admin_url": server.admin_url,
                           "pid": server.pid, "keys": str(folder / "secrets.json")}))


@channel_app.command()
def stop(data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Stop the channel started with `start` (by its recorded pid)."""
    state = _state(data_dir)
    stop_pid(int(state["pid"]), started_at=state.get("started_at"))
    (_folder(data_dir) / STATE_FILE).unlink(missing_ok=True)
    typer.echo(f"channel (pid {state['pid']}) stopped")


@channel_app.command()
def faults(data_dir: DataDirOpt = DEFAULT_DATA_DIR,
           seed: Annotated[int | None, typer.Option(help="seed of every fault decision")] = None,
           drop: Probability = None, duplicate: Probability = None, delay: Probability = None,
           delay_seconds: Annotated[float | None, typer.Option(min=0.0)] = None,
           reorder: Probability = None, error: Probability = None,
           error_after: Probability = None, hang: Probability = None,
           hang_seconds: Annotated[float | None, typer.Option(min=0.0)] = None,
           clear: Annotated[bool, typer.Option(help="no faults at all")] = False) -> None:
    """Show the faults in force and what fired; with options, put a new set in force
    (options not given are zero)."""
    state = _state(data_dir)
    given = {"seed": seed, "callback_drop": drop, "callback_duplicate": duplicate,
             "callback_delay": delay, "callback_delay_seconds": delay_seconds,
             "callback_reorder": reorder, "error_rate": error,
             "error_after_rate": error_after, "hang_rate": hang, "hang_seconds": hang_seconds}
    config = {k: v for k, v in given.items() if v is not None}

    async def go() -> dict[str, Any]:
        async with ChannelAdmin(state["admin_url"], state["admin_key"]) as admin:
            if config or clear:
                await admin.set_faults(**config)
            return await admin.faults()

    typer.echo(json.dumps(_run(go()), indent=2))


@channel_app.command()
def down(seconds: Annotated[float, typer.Argument(min=0.1)],
         data_dir: DataDirOpt = DEFAULT_DATA_DIR,
         mode: Annotated[OutageMode, typer.Option(
             help="refuse (connections refused), reset (accepted, then reset) or 503 "
                  "(Service Unavailable with Retry-After)")] = OutageMode.unavailable,
         ) -> None:
    """Make the merchant API unavailable for SECONDS."""
    state = _state(data_dir)

    async def go() -> None:
        async with ChannelAdmin(state["admin_url"], state["admin_key"]) as admin:
            await admin.down(seconds, mode.value)

    _run(go())
    typer.echo(f"channel down for {seconds:g} s ({mode})")


@channel_app.command()
def up(data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """End an outage now."""
    state = _state(data_dir)

    async def go() -> None:
        async with ChannelAdmin(state["admin_url"], state["admin_key"]) as admin:
            await admin.up()

    _run(go())
    typer.echo("channel up")


@channel_app.command()
def statement(data_dir: DataDirOpt = DEFAULT_DATA_DIR,
              day: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default today, UTC)")]
              = None,
              out: Annotated[Path | None, typer.Option(help="write the CSV here")] = None,
              ) -> None:
    """The settlement statement of a day, as CSV."""
    state = _state(data_dir)
    try:
        which = date.fromisoformat(day) if day else datetime.now(UTC).date()
    except ValueError:
        typer.echo(f"not a date: {day}", err=True)
        raise typer.Exit(2) from None

    async def go() -> str:
        async with ChannelClient(state["url"], state["api_key"]) as client:
            return await client.statement_csv(which)

    text: str = _run(go())
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"{len(text.splitlines()) - 1} rows written to {out}")
