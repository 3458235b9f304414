"""Optional features and the pip extras that install them (``pyproject.toml``
``[project.optional-dependencies]``; ``make setup`` installs ``[all]``).

A feature whose extra is missing stops with one message naming the extra, before any model is
loaded (``decodebench.config.validate_before_loading`` and the CLI's launcher check), e.g.
``logger=wandb needs the 'wandb' extra: pip install 'decodebench[wandb]'``.
"""

from __future__ import annotations

import importlib.util

from decodebench.registry import DecodeBenchError


class MissingExtraError(DecodeBenchError, ImportError):
    """An optional dependency of a chosen feature is not installed (the CLI exits with code 2)."""


def require_extra(extra: str, module: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` (a dependency of extra ``extra``) imports.

    Args:
        extra: the pip extra, e.g. ``wandb``.
        module: the import name it provides, e.g. ``wandb`` or ``hydra_plugins.hydra_submitit_launcher``.
        feature: what the user chose, for the message, e.g. ``logger=wandb``.
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (hydra_plugins) is missing
        found = False
    if not found:
        raise MissingExtraError(f"{feature} needs the '{extra}' extra (module '{module}' is not installed): "
                                f"pip install 'decodebench[{extra}]'")


# the Hydra launchers of ``hydra/launcher=<name>`` (conf/hydra/launcher/) -> (extra, module)
LAUNCHER_EXTRAS = {
    "slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    "submitit_local": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    "submitit_slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    "local_pool": ("pool", "hydra_plugins.hydra_joblib_launcher"),
    "joblib": ("pool", "hydra_plugins.hydra_joblib_launcher"),
}


def require_launcher(name: str) -> None:
    """The extra of ``hydra/launcher=<name>``, if it needs one."""
    if name in LAUNCHER_EXTRAS:
        extra, module = LAUNCHER_EXTRAS[name]
        require_extra(extra, module, f"hydra/launcher={name}")
