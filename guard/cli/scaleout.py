"""``--ray`` and its options, shared by ``guard calibrate`` and ``guard audit``: the items'
MPSs on a Ray cluster (guard.scaleout), everything else here."""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING, Annotated

import typer

from guard.cli.common import err_console, fatal

if TYPE_CHECKING:
    from guard.scaleout import RayExecutor

Option = typer.Option
RayOpt = Annotated[
    str | None,
    Option(
        "--ray",
        metavar="ADDRESS",
        help="compute the MPSs on a Ray cluster (needs mps-guard[ray]): 'local' starts one on "
        "this machine for the run, 'auto' joins the cluster this machine belongs to (or "
        "RAY_ADDRESS), or give its address (ray://HEAD:10001 or HEAD:6379); the records equal "
        "a local run's, the cache and resuming work as without it",
    ),
]
RayWorkersOpt = Annotated[
    int | None,
    Option(
        "--ray-workers",
        help="Ray workers, each one process with its own model session (default: as many as "
        "the cluster's CPUs, or GPUs with --ray-gpus, hold)",
    ),
]
RayCpusOpt = Annotated[
    float, Option("--ray-cpus", help="CPUs each Ray worker takes (its onnxruntime threads)")
]
RayGpusOpt = Annotated[float, Option("--ray-gpus", help="GPUs each Ray worker takes")]


def ray_executor(
    address: str | None, workers: int | None, cpus: float, gpus: float
) -> contextlib.AbstractContextManager[RayExecutor | None]:
    """A context holding the Ray executor of ``--ray ADDRESS`` (None without ``--ray``); checked
    before anything is loaded, so a missing extra or a bad option fails at once (exit 2)."""
    if address is None:
        if workers is not None or cpus != 1.0 or gpus != 0.0:
            raise fatal("--ray-workers, --ray-cpus and --ray-gpus need --ray")
        return contextlib.nullcontext()
    if importlib.util.find_spec("ray") is None:
        from guard.scaleout import RAY_MISSING

        raise fatal(RAY_MISSING)
    from guard.errors import ConfigError
    from guard.scaleout import RayExecutor, RaySettings

    try:
        return RayExecutor(RaySettings(address, workers, cpus, gpus))
    except ConfigError as exc:
        raise fatal(str(exc)) from None


def report_ray(executor: RayExecutor | None) -> None:
    """What the cluster did: its workers and nodes, and the batches sent again after a worker
    died (on stderr, with the run's other notes)."""
    if executor is None:
        return
    for line in executor.stats.summary():
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
