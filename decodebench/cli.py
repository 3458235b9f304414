"""``decodebench``: the Hydra app (one run, or a sweep with ``-m``).

Config groups (``model=``, ``method=``, ``task=``, ``gen=``, ``experiment=``) are checked before
Hydra composes, so an unknown name exits with code 2 and lists the valid choices with a "did you
mean". Invalid values are caught by the typed config (:mod:`decodebench.config`) before any model
is loaded; nothing already computed in a run directory is deleted by a bad invocation.
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from decodebench.config import to_run_config
from decodebench.registry import DecodeBenchError, UnknownNameError

log = logging.getLogger("decodebench")
GROUPS = ("model", "method", "task", "gen", "experiment")


def group_choices(group: str) -> list[str]:
    folder = resources.files("decodebench.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


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


@hydra.main(config_path="pkg://decodebench.conf", config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> Optional[dict]:
    from decodebench.analysis.report import load_records, render, report_table
    from decodebench.runners.local import run

    hydra_cfg = HydraConfig.get()
    try:
        run_cfg = to_run_config(cfg)
        run_cfg.run_dir = hydra_cfg.runtime.output_dir
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["run_dir"] = run_cfg.run_dir
        result = run(run_cfg, resolved)
    except DecodeBenchError as error:
        log.error("%s", error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed cell
        sys.exit(error.exit_code)
    print(render(report_table(load_records([result.run_dir])), "md"))
    print(f"\nrun dir: {result.run_dir}")
    return result.summary


def main(argv: Optional[list[str]] = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        check_group_overrides(sys.argv[1:])
    except DecodeBenchError as error:
        print(f"decodebench: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    hydra_app()


if __name__ == "__main__":
    main()
