"""Method registry: a method is one module here + one YAML in ``conf/method/``.

The YAML is the registry entry: ``impl: "decodebench.methods.<module>:<Class>"`` is imported lazily
when the method is chosen, and its ``params`` (after the chosen preset) are validated against the
class's ``Params`` dataclass, so a misspelt or out-of-range hyperparameter is a clear error.
"""

from __future__ import annotations

import dataclasses
from importlib import resources

import yaml

from decodebench.config import ConfigValueError, MethodConfig
from decodebench.engine.drafting import Drafter
from decodebench.registry import UnknownNameError, import_entry, unknown_name_message


def available_methods() -> list[str]:
    """Names of the methods that have a YAML in conf/method/."""
    folder = resources.files("decodebench.conf") / "method"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def method_config(name: str) -> MethodConfig:
    """The MethodConfig of ``conf/method/<name>.yaml``."""
    if name not in available_methods():
        raise UnknownNameError("method", name, available_methods())
    data = yaml.safe_load((resources.files("decodebench.conf") / "method" / f"{name}.yaml").read_text())
    return MethodConfig(**data)


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
