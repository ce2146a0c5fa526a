"""The ``guard`` command line. Thin: commands build settings, call the library and report."""

import typer

from guard.cli.calibrate import calibrate
from guard.cli.explain import explain, run_demo

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mps-guard: minimal sufficient pixel sets of an image classifier's predictions.",
)
app.command()(explain)
app.command("demo")(run_demo)
app.command()(calibrate)

__all__ = ["app"]
