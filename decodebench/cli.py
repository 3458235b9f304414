"""``decodebench``: the Hydra app (one run, or a sweep with ``-m``).

Before Hydra runs anything, :func:`check_invocation` checks the command line: config group names
(``model=``, ``method=``, ``task=``, ``gen=``, ``experiment=``, ``logger=``) against the YAMLs of
``conf/<group>/`` (the valid choices and a "did you mean"), then every cell's composed config
against the typed schema (:mod:`decodebench.config`: a wrong type or unknown key, named by its full
key) and :func:`~decodebench.config.validate_before_loading` (draft model, batching, device).
Any of these exits with code 2 before a model is loaded; nothing already computed in a run
directory is deleted by a bad invocation.

In a sweep (``-m``) every cell is one run directory named from its overrides. A failing cell never
stops the others, whatever the launcher (``hydra/launcher=slurm`` or ``local_pool`` included): its
``status.json`` records the error, the sweep prints the failed cells and the merged report at the
end (:mod:`decodebench.runners.sweep`), and ``decodebench`` exits with code 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from decodebench.config import (
    compose_run_config,
    group_choices,
    params_given,
    sweep_cells,
    to_run_config,
    validate_before_loading,
)
from decodebench.extras import require_launcher
from decodebench.registry import DecodeBenchError, UnknownNameError

log = logging.getLogger("decodebench")
GROUPS = ("model", "method", "task", "gen", "experiment", "logger")

# Sweep cell folders are named from overrides; a value such as shard=0/4 must not add a folder level.
OmegaConf.register_new_resolver("path_safe", lambda text: str(text).replace("/", "_"), replace=True)


def check_group_overrides(args: list[str]) -> None:
    """Reject ``group=name`` overrides naming no YAML in ``conf/<group>/`` (sweeps: ``a,b,c``)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = group_choices(key)
        for name in value.split(","):
            if name not in choices:
                raise UnknownNameError(key, name, choices)


def check_invocation(args: list[str]) -> None:
    """Everything a user can get wrong on the command line, checked before any model is loaded:
    group names, then each cell of the (sweep) invocation composed, typed and validated."""
    check_group_overrides(args)
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "hydra/launcher":
            require_launcher(value)
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]  # Hydra checks its own
    multirun = "-m" in args or "--multirun" in args
    for cell in sweep_cells(overrides) if multirun else [overrides]:
        validate_before_loading(compose_run_config(cell))


def run_from_config(cfg: DictConfig, run_dir: str, sweep_dir: str | None):
    """Validate the composed config and run it into ``run_dir`` (``sweep_dir``: the W&B group)."""
    from decodebench.runners.local import run

    run_cfg = to_run_config(cfg)
    run_cfg.method.pinned = params_given(HydraConfig.get().overrides.task)  # they win over the preset
    run_cfg.run_dir = run_dir
    if sweep_dir and run_cfg.logger.group is None:
        run_cfg.logger.group = Path(sweep_dir).name
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    resolved["run_dir"] = run_cfg.run_dir
    resolved["method"]["params"] = run_cfg.method.params  # complete: the Params defaults included
    resolved["task"]["params"] = run_cfg.task.params
    return run(run_cfg, resolved)


def run_cell(cfg: DictConfig, hydra_cfg) -> dict | None:
    """One cell of a sweep: its failure is recorded in ``status.json``, never raised to the launcher."""
    from decodebench.runners.sweep import mark_cell

    run_dir, overrides = hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task)
    mark_cell(run_dir, "running", overrides)
    try:
        result = run_from_config(cfg, run_dir, hydra_cfg.sweep.dir)
    except Exception as error:  # the sweep goes on and reports this cell at the end
        log.error("cell %s failed: %s", run_dir, error, exc_info=not isinstance(error, DecodeBenchError))
        mark_cell(run_dir, "failed", overrides, error)
        return {"error": f"{type(error).__name__}: {error}"}
    mark_cell(run_dir, "complete", overrides)
    summary = result.summary
    log.info("cell %s complete: %s records, speedup %s, tau %s", run_dir, summary.get("records"),
             summary.get("speedup"), summary.get("tau"))
    return summary


@hydra.main(config_path="pkg://decodebench.conf", config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> dict | None:
    from decodebench.analysis.report import load_records, render, report_table

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_cell(cfg, hydra_cfg)
    try:
        result = run_from_config(cfg, hydra_cfg.runtime.output_dir, None)
    except DecodeBenchError as error:
        log.error("%s", error)
        sys.exit(error.exit_code)
    print(render(report_table(load_records([result.run_dir])), "md"))
    print(f"\nrun dir: {result.run_dir}")
    return result.summary


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        check_invocation(sys.argv[1:])
    except DecodeBenchError as error:
        print(f"decodebench: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    hydra_app()
    from decodebench.runners.sweep import last_outcome

    outcome = last_outcome()
    if outcome is not None and not outcome.ok:
        failed = len(outcome.cells) - len(outcome.with_status("complete"))
        print(f"decodebench: error: {failed} of {len(outcome.cells)} cells did not complete (listed above; "
              f"details in {outcome.sweep_dir}/sweep.json and each cell's status.json)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
