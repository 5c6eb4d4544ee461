"""`paycluster drill planned|crash|partition`: the failover drills on the command line
(see cluster/drill/run.py for what each does and cluster/drill/report.py for the report)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cluster.cli_options import DEFAULT_CUT_MODE, CutMode, DurabilityMode
from cluster.console import Stop, console, err_console, shielded, terminate_as_interrupt

_T = TypeVar("_T")

drill_app = typer.Typer(help="Rehearse losing a region under load (through the geo router) "
                             "and report RTO, RPO, duplicates, client errors, invariants "
                             "and replication lag.", no_args_is_help=True)

RegionOpt = Annotated[str, typer.Option("--region", "-r", help="the region to fail")]
Duration = Annotated[float, typer.Option(
    "--duration", min=1.0, help="seconds of workload (at least: it runs on until the "
                                "failback is done and a few seconds after)")]
Rate = Annotated[float, typer.Option("--rate", min=0.1, help="payments per second, in total")]
ReportDir = Annotated[Path | None, typer.Option(
    "--report", help="directory for report.json, report.md, timeline.png "
                     "(default: <data dir>/drills/<kind>-<run id>, or "
                     "./drill-reports/<kind>-<run id> without --data-dir)")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", "-d", help="a running lab to drill on; without one running there, the "
                             "drill starts its own there (default: a temp dir) and stops it "
                             "afterwards")]
WanScaleOpt = Annotated[float, typer.Option(
    "--wan-scale", min=0.0, help="round-trip multiplier of a lab the drill starts")]
DurabilityOpt = Annotated[DurabilityMode | None, typer.Option(
    "--durability", help="put the region in local or regional mode first (regional: the "
                         "takeover region is its buddy); default: leave it as it is")]
ToOpt = Annotated[str | None, typer.Option(
    "--to", help="the takeover region (default: the region's buddy, else the next one)")]
DrainOpt = Annotated[bool, typer.Option(
    "--drain/--no-drain", help="drain the handing-over region at the routers during a "
                               "planned handover")]
CutModeOpt = Annotated[CutMode, typer.Option(
    "--cut-mode", help="partition: blackhole (traffic held, as in a real partition) or reset "
                       "(connections reset)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed of the workload")]
TailLagOpt = Annotated[float, typer.Option(
    "--tail-lag", min=0.0, help="crash: delay the region's outgoing replication by this "
                                "many seconds just before the crash, so that local mode "
                                "has a tail to lose")]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def run_stoppable(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` that SIGTERM and SIGHUP stop the way Ctrl-C does: the main
    task is cancelled (its cleanup runs: the workload is cancelled, a cut region healed),
    then `cluster.console.Stop` is raised (KeyboardInterrupt for Ctrl-C, as asyncio.run
    does). The CLI's own handlers (`terminate_as_interrupt`) raise `Stop` wherever the
    main thread is: inside the event loop that lands in a task or a callback, where
    asyncio or an ``except Exception`` swallows it, and the drill went on. Outside the
    loop they are in force again."""
    async def runner() -> _T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        got: list[int] = []

        def on_signal(signum: int) -> None:
            got.append(signum)
            task.cancel()

        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await main
        except asyncio.CancelledError:
            if got:
                raise Stop(signal.Signals(got[0]).name) from None
            raise
        finally:
            for sig, old in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, old)

    return asyncio.run(runner())


def _run(kind: str, region: str, duration: float, rate: float, report: Path | None,
         data_dir: Path | None, wan_scale: float, durability: str | None, to: str | None,
         drain: bool, cut_mode: str, seed: int, tail_lag: float = 0.0) -> None:
    import shutil
    import tempfile

    from cluster.drill.report import print_report, write_report
    from cluster.drill.run import DrillConfig, DrillError, drill_lab, run_drill_async
    from cluster.drill.workload import WorkloadError
    from cluster.lab import ClusterError
    from cluster.servers import ServerStartError

    # Without --data-dir: a lab of the drill's own in a temp dir, removed afterwards
    # (kept when the drill failed, for the logs); the report goes to ./drill-reports.
    temp = data_dir is None
    lab_dir = data_dir or Path(tempfile.mkdtemp(prefix="paycluster-drill-"))
    config = DrillConfig(kind, region, duration=duration, rate=rate, to=to,
                         durability=durability, drain=drain, cut_mode=cut_mode, seed=seed,
                         tail_lag=tail_lag)
    ok = False
    with terminate_as_interrupt():
        try:
            with drill_lab(lab_dir, wan_scale, on_status=console.print,
                           shield=shielded) as cluster:
                result = run_stoppable(run_drill_async(cluster, config, console.print))
                target = report or ((Path("drill-reports") if temp else
                                     cluster.data_dir / "drills") / f"{kind}-{result.run_id}")
                paths = write_report(result, target)
                print_report(result, console)
                console.print(f"report: {paths['md']} ({paths['json'].name}, "
                              f"{paths['png'].name})")
                ok = result.ok
        except (ClusterError, ServerStartError, DrillError, WorkloadError, ValueError) as exc:
            err_console.print(f"[red]drill failed:[/] {exc}")
        except (KeyboardInterrupt, Stop):
            err_console.print("interrupted; the lab the drill started was stopped")
            raise typer.Exit(130) from None
    if temp and ok:
        shutil.rmtree(lab_dir, ignore_errors=True)
    elif temp:
        err_console.print(f"kept the lab's files in {lab_dir} for the logs")
    if not ok:
        raise typer.Exit(1)


@drill_app.command("planned")
def planned(region: RegionOpt, duration: Duration = 15.0, rate: Rate = 20.0,
            report: ReportDir = None, data_dir: DataDirOpt = None,
            wan_scale: WanScaleOpt = 0.25, durability: DurabilityOpt = None,
            to: ToOpt = None, drain: DrainOpt = False, seed: SeedOpt = 0) -> None:
    """Planned handover of the region's accounts to the takeover region, then failback."""
    _run("planned", region, duration, rate, report, data_dir, wan_scale, durability, to,
         drain, "blackhole", seed)


@drill_app.command("crash")
def crash(region: RegionOpt, duration: Duration = 15.0, rate: Rate = 20.0,
          report: ReportDir = None, data_dir: DataDirOpt = None,
          wan_scale: WanScaleOpt = 0.25, durability: DurabilityOpt = None,
          to: ToOpt = None, seed: SeedOpt = 0, tail_lag: TailLagOpt = 0.0) -> None:
    """SIGKILL the region's node and PostgreSQL; takeover; restart, reconcile, failback."""
    _run("crash", region, duration, rate, report, data_dir, wan_scale, durability, to,
         False, "blackhole", seed, tail_lag)


@drill_app.command("partition")
def partition(region: RegionOpt, duration: Duration = 15.0, rate: Rate = 20.0,
              report: ReportDir = None, data_dir: DataDirOpt = None,
              wan_scale: WanScaleOpt = 0.25, durability: DurabilityOpt = None,
              to: ToOpt = None, cut_mode: CutModeOpt = DEFAULT_CUT_MODE,
              seed: SeedOpt = 0) -> None:
    """Cut every WAN link of the region; takeover by the majority; heal; failback."""
    _run("partition", region, duration, rate, report, data_dir, wan_scale, durability, to,
         False, cut_mode, seed)
