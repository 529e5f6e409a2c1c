"""``squadbus simulate``: run the guide's scenarios (or a squad you size) on real inboxes; say if each holds.

Exit status: 0 every scenario held, 1 at least one did not, 2 the simulation
could not run (bad URL, broker down, bad options), always with one line on stderr.
The engine is :mod:`squadbus.benchmarks.simulate`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from squadbus.benchmarks.loops import DEFAULT_LOOP, LOOPS, run
from squadbus.benchmarks.simulate import SimConfig, SimulateError, configs, format_report
from squadbus.benchmarks.simulate import simulate as run_simulation
from squadbus.benchmarks.simulate_host import ITERATOR, RECEIVE_MODES
from squadbus.benchmarks.stats import Environment
from squadbus.cli.errors import EXIT_ERROR, EXIT_USAGE
from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings


class ProgressLine:
    """A one-line progress bar on stderr (a terminal), or a line per phase (anything else)."""

    def __init__(self, config: SimConfig, stream: Any = None) -> None:
        self.config = config
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._phase = ""
        self._send_started = 0.0

    def __call__(self, phase: str, figures: dict[str, Any]) -> None:
        """Show ``phase`` with ``figures`` (the hosts' totals so far)."""
        c = self.config
        new_phase = phase != self._phase
        self._phase = phase
        if phase == "send" and new_phase:
            self._send_started = time.monotonic()
        if phase == "opened":
            text = f"opened {figures['opened']:,} of {figures['of']:,} inboxes in {figures['seconds']:.1f} s"
        elif phase == "open":
            text = f"opening inboxes {figures['opened']:,}/{c.agents:,}"
        elif phase == "send":
            done = min(1.0, (time.monotonic() - self._send_started) / c.duration)
            bar = "#" * int(done * 30)
            text = (f"sending [{bar:30}] {done:4.0%}  sent {figures['sent']:,}  "
                    f"delivered {figures['delivered']:,}/{figures['expected']:,}")
        else:
            text = f"draining: delivered {figures['delivered']:,}/{figures['expected']:,}"
        if self.tty:
            self.stream.write("\r" + text[:110].ljust(110) + ("\n" if phase == "opened" else ""))
            self.stream.flush()
        elif new_phase or phase == "opened":
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        """End the bar's line."""
        if self.tty and self._phase != "opened":
            self.stream.write("\n")
            self.stream.flush()


@click.command()
@click.option("--scenario", "scenarios", type=int, multiple=True, metavar="1..5",
              help="One of the guide's scenarios (repeat for several): 1 = 100 agents × 10 msgs/h, 2 = 500 × 20, "
                   "3 = 1,000 × 50, 4 = 5,000 × 100, 5 = 10,000 × 100.")
@click.option("--agents", type=int, default=None, metavar="N", help="A squad of N agents (with --msgs-per-hour).")
@click.option("--msgs-per-hour", type=float, default=None, metavar="M", help="Messages each agent sends per hour.")
@click.option("--url", "backend_url", default=None,
              help="Backend URL (overrides the group's --url / SQUADBUS_URL; default memory://).")
@click.option("--store-url", default=None, help="History store the db-writer fills (default: a temporary SQLite file).")
@click.option("--processes", default=1, type=int, show_default=True,
              help="Host processes the agents are spread over (crc32(agent) % P); 1 on memory://.")
@click.option("--speedup", default=1.0, type=float, show_default=True, help="Multiply the scenario's rate.")
@click.option("--duration", default=30.0, type=float, show_default=True, help="Seconds of sending.")
@click.option("--drain", default=10.0, type=float, show_default=True,
              help="Seconds at most to wait after sending for the last deliveries and rows.")
@click.option("--warmup", default=0.0, type=float, show_default=True,
              help="Leave the first seconds of sending out of the latency percentiles (e.g. Kafka group joins).")
@click.option("--open-timeout", default=60.0, type=float, show_default=True,
              help="Seconds a host may take to open its inboxes; then the scenario is not held.")
@click.option("--p99-target", "p99_target", default=None, type=float, metavar="MS",
              help="The p99 a held scenario stays under (default 10 ms, 50 ms on Kafka).")
@click.option("--seed", default=0, type=int, show_default=True, help="Seed of the message mix.")
@click.option("--loop", "loop", type=click.Choice(LOOPS), default=None,
              help="Event loop of the parent and every host (default asyncio; uvloop measured no better on memory://).")
@click.option("--receive", type=click.Choice(RECEIVE_MODES), default=ITERATOR, show_default=True,
              help="How agents take deliveries: a task per agent iterating its inbox, or a plain-function handler "
                   "the inbox calls inline (no task per agent).")
@click.option("--json", "json_path", default=None, metavar="FILE",
              help="Also write the figures as JSON to FILE ('-': JSON on stdout instead of the table).")
@click.pass_context
def simulate(ctx: click.Context, scenarios: tuple[int, ...], agents: int | None, msgs_per_hour: float | None,
             backend_url: str | None, store_url: str | None, processes: int, speedup: float, duration: float,
             drain: float, warmup: float, open_timeout: float, p99_target: float | None, seed: int,
             loop: str | None, receive: str, json_path: str | None) -> None:
    """Simulated agents on real inboxes: rates, latency, losses, store lag, resources; held or not held."""
    base_url = ctx.obj.url if isinstance(ctx.obj, Settings) else Settings.from_env().url
    url = backend_url or base_url
    try:
        runs = configs(url, scenarios, agents, msgs_per_hour, processes=processes, speedup=speedup,
                       duration=duration, drain=drain, warmup=warmup, open_timeout=open_timeout,
                       store_url=store_url, seed=seed, p99_target_ms=p99_target, loop=loop or DEFAULT_LOOP,
                       receive=receive)
    except ConfigError as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    reports = []
    for config in runs:
        progress = ProgressLine(config)
        try:
            reports.append(run(run_simulation(config, progress), config.loop))
        except SimulateError as exc:
            progress.done()
            click.echo(f"squadbus: error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        progress.done()
        if json_path != "-":
            click.echo(format_report(reports[-1]))
    document = {"runs": [r.as_dict() for r in reports], "environment": Environment.current().as_dict()}
    if json_path == "-":
        click.echo(json.dumps(document, indent=2))
    elif json_path:
        try:
            with open(json_path, "w") as out:
                json.dump(document, out, indent=2)
        except OSError as exc:
            click.echo(f"squadbus: error: cannot write {json_path}: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
    if len(reports) > 1 and json_path != "-":
        click.echo("\n".join(r.verdict for r in reports))
    ctx.exit(0 if all(r.held for r in reports) else EXIT_ERROR)
