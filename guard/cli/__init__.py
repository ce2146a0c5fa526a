"""The ``guard`` command line. Thin: commands build settings, call the library and report."""

import typer

from guard.cli import audit, calibrate, client, explain, serve
from guard.cli.common import guarded

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mps-guard: minimal sufficient pixel sets of an image classifier's predictions.",
)
app.command()(guarded(explain.explain))
app.command("demo")(guarded(explain.run_demo))
app.command()(guarded(calibrate.calibrate))
app.command()(guarded(audit.audit))
app.command()(guarded(serve.serve))
app.command()(guarded(client.client))

__all__ = ["app"]
