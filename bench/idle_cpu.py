"""What an idle lab costs: CPU milliseconds per second of each of its processes while
nobody sends it anything (the background workers, pollers, heartbeats, lease renewals and
replication keep-alives). Every test module that holds a lab pays this for as long as the
lab is up, and every payment pays its share of the node's part.

    python -m bench.idle_cpu                       # starts a 3-region lab (no router)
    python -m bench.idle_cpu --regions 1 --samples 5
    python -m bench.idle_cpu --data-dir DIR        # a lab that is already running

Prints a table (median of the samples per process) and writes
bench/results/idle_cpu.json. A lab it starts is stopped at the end (also on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import psutil
import typer
from rich.console import Console
from rich.table import Table

from bench.runner import BenchError, bench_app, guarded
from bench.stats import process_cpu_seconds
from cluster.lab import start_cluster

DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "idle_cpu.json"
SETTLE_SECONDS = 20.0
"""A lab just started is still wiring replication and taking leases: wait this long."""


def lab_processes(data_dir: Path) -> dict[str, int]:
    """Name -> pid of every process `cluster.json` in `data_dir` lists (a region's
    servers as `<region>.<kind>`, then the lab's shared processes)."""
    state = json.loads((data_dir / "cluster.json").read_text())
    found: dict[str, int] = {}
    for region, entry in state["regions"].items():
        for kind, value in entry.items():
            if isinstance(value, dict) and "pid" in value:
                found[f"{region}.{kind}"] = int(value["pid"])
    for kind in ("wan", "pg_tls", "channel"):
        value = state.get(kind)
        if isinstance(value, dict) and "pid" in value:
            found[kind] = int(value["pid"])
    for i, router in enumerate(state.get("routers") or []):
        if isinstance(router, dict) and "pid" in router:
            found[f"router{i}"] = int(router["pid"])
    return found


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def sample(processes: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU ms per second of each process over `seconds`, plus `machine` (the whole
    machine's busy time, to see what else ran)."""
    before = {name: process_cpu_seconds(pid, with_children=True) for name, pid in processes.items()}
    busy, start = _busy_seconds(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    out = {name: (process_cpu_seconds(pid, with_children=True) - before[name]) / elapsed * 1000
           for name, pid in processes.items()}
    out["machine"] = (_busy_seconds() - busy) / elapsed * 1000
    return out


def measure(args: SimpleNamespace, console: Console) -> dict[str, Any]:
    """Sample a running lab (`args.data_dir`) or one started for the purpose."""
    if args.data_dir is not None:
        return _measure_running(args.data_dir, args, console)
    with tempfile.TemporaryDirectory(prefix="paycluster-idle-") as tmp:
        console.print(f"starting a {args.regions}-region lab ...")
        cluster = start_cluster(Path(tmp), regions=args.regions, routers=0)
        try:
            console.print(f"letting it settle for {SETTLE_SECONDS:g} s ...")
            time.sleep(SETTLE_SECONDS)
            return _measure_running(Path(tmp), args, console)
        finally:
            cluster.stop()


def _measure_running(data_dir: Path, args: SimpleNamespace, console: Console
                     ) -> dict[str, Any]:
    if not (data_dir / "cluster.json").exists():
        raise BenchError(f"no lab in {data_dir} (cluster.json missing)")
    processes = lab_processes(data_dir)
    samples = []
    for n in range(1, args.samples + 1):
        console.print(f"sample {n}/{args.samples}: {args.seconds:g} s ...")
        samples.append(sample(processes, args.seconds))
    return {"processes": processes, "samples": samples}


app = bench_app()


@app.command(help="CPU per second of every process of an idle lab.")
def cli(data_dir: Annotated[Path | None, typer.Option(
            help="a running lab's data dir; default: start a lab for the measurement")] = None,
        regions: Annotated[int, typer.Option(min=1, max=3, help="regions of a lab it "
                                                                "starts")] = 3,
        samples: Annotated[int, typer.Option(min=1, help="samples; medians are quoted")] = 3,
        seconds: Annotated[float, typer.Option(min=1.0, help="length of one sample")] = 20.0,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
        ) -> None:
    """The benchmark's options; exits with its exit code."""
    raise typer.Exit(main(SimpleNamespace(data_dir=data_dir, regions=regions,
                                          samples=samples, seconds=seconds,
                                          json_out=json_out)))


def main(args: SimpleNamespace) -> int:
    """Measure, print the table and write the JSON."""
    console = Console()

    def run() -> int:
        result = measure(args, console)
        names = sorted(result["processes"])
        medians = {name: statistics.median(s[name] for s in result["samples"])
                   for name in [*names, "machine"]}
        table = Table(title=f"idle lab: CPU ms per second, median of {args.samples} x "
                            f"{args.seconds:g} s")
        for col in ("process", "ms/s"):
            table.add_column(col, justify="right" if col == "ms/s" else "left")
        for name in names:
            table.add_row(name, f"{medians[name]:.1f}")
        table.add_row("every process of the lab", f"{sum(medians[n] for n in names):.1f}")
        table.add_row("the whole machine (busy)", f"{medians['machine']:.0f}")
        console.print(table)
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            "config": {"data_dir": None if args.data_dir is None else str(args.data_dir),
                       "regions": args.regions, "samples": args.samples,
                       "seconds": args.seconds},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "load": os.getloadavg()},
            "medians_ms_per_s": medians, "result": result}, indent=2))
        console.print(f"wrote {args.json_out}")
        return 0

    return guarded(run, console)


if __name__ == "__main__":
    app(prog_name="python -m bench.idle_cpu")
