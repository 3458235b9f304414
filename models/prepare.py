"""Prepare catalogue models ahead of a run (used by ``make setup``).

Usage: ``python -m decodebench.models.prepare smollm2-135m [more names] [--cache-dir DIR]``.
Embedded models are converted into the cache once; each model is then loaded to report where it
lives and how long a load takes.
"""

from __future__ import annotations

import argparse
import sys
import time

from decodebench.config import default_cache_dir
from decodebench.models.embedded import embedded_model_dir, prepare_embedded
from decodebench.models.loading import available_models, load_model, load_model_config
from decodebench.registry import DecodeBenchError


def prepare(name: str, cache_dir: str) -> None:
    """Prepare (if embedded) and load one catalogue model, printing location and timings."""
    cfg = load_model_config(name)
    if cfg.source == "embedded":
        started = time.perf_counter()
        prepare_embedded(cfg, cache_dir)
        print(
            f"{name}: prepared at {embedded_model_dir(cfg, cache_dir)} "
            f"({time.perf_counter() - started:.1f} s, 0 if it was already there)"
        )
    loaded = load_model(cfg, cache_dir=cache_dir)
    info = loaded.info
    print(
        f"{name}: loaded from {info['location']} in {info['load_seconds']:.2f} s: "
        f"{info['architecture']}, {info['num_layers']} layers, hidden {info['hidden_size']}, "
        f"vocab {info['vocab_size']}, {info['num_parameters'] / 1e6:.1f} M parameters, {info['dtype']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decodebench.models.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="+", metavar="MODEL", help=f"catalogue model names ({', '.join(available_models())})"
    )
    parser.add_argument(
        "--cache-dir",
        default=default_cache_dir(),
        help="cache root (default: $DECODEBENCH_CACHE or ~/.cache/decodebench)",
    )
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            prepare(name, args.cache_dir)
    except DecodeBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
