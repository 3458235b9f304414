"""Method registry: a method is one module here + one YAML in ``conf/method/``.

The YAML is the registry entry: ``impl: "decodebench.methods.<module>:<Class>"`` is imported lazily
when the method is chosen, and its ``params`` (after the chosen preset) are validated against the
class's ``Params`` dataclass, so a misspelt or out-of-range hyperparameter is a clear error.
"""

from __future__ import annotations

import dataclasses

from decodebench.config import ConfigValueError, MethodConfig, check_method_params, group_choices, group_config
from decodebench.engine.drafting import Drafter
from decodebench.registry import import_entry, unknown_name_message


def available_methods() -> list[str]:
    """Names of the methods that have a YAML in conf/method/."""
    return group_choices("method")


def method_config(name: str) -> MethodConfig:
    """The MethodConfig of ``conf/method/<name>.yaml``, its ``params`` complete (Params defaults)."""
    cfg = MethodConfig(**group_config("method", name))
    check_method_params(cfg)
    return cfg


def build_params(params_cls: type, values: dict, method: str):
    known = {f.name for f in dataclasses.fields(params_cls)}
    for key in values:
        if key not in known:
            raise ConfigValueError(unknown_name_message("parameter", key, known, f" for method '{method}'"))
    return params_cls(**values)


def build_method(cfg: MethodConfig, device: str = "cpu") -> Drafter:
    """Instantiate the method described by ``cfg`` with its resolved (preset) parameters."""
    cls = import_entry(cfg.impl)
    params = build_params(cls.Params, cfg.resolved_params(device), cfg.name)
    return cls(params)


def batchable_methods() -> list[str]:
    """Names of the methods whose drafter decodes rows of a batch together (``supports_batch``)."""
    return [
        name for name in available_methods() if getattr(import_entry(method_config(name).impl), "supports_batch", False)
    ]
