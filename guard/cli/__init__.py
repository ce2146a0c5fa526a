"""The ``guard`` command line. Thin: commands build settings, call the library and report."""

import typer

from guard.cli.audit import audit
from guard.cli.calibrate import calibrate
from guard.cli.client import client
from guard.cli.common import guarded
from guard.cli.explain import explain, run_demo
from guard.cli.serve import serve

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mps-guard: minimal sufficient pixel sets of an image classifier's predictions.",
)
app.command()(guarded(explain))
app.command("demo")(guarded(run_demo))
app.command()(guarded(calibrate))
app.command()(guarded(audit))
app.command()(guarded(serve))
app.command()(guarded(client))

__all__ = ["app"]
