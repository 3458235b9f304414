"""Verify-latency curve of the engine on this machine (kept for old commands and
benchmarks/replay_pld.py): the ``decodebench-profile`` console script
(:mod:`decodebench.engine.profile`) with ``--backend eager`` and the curve also written to
``results/benchmarks/verify_curve.json``. Any ``decodebench-profile`` option can be added.

Usage: python benchmarks/profile_verify.py [--backend all] [--context 175] [--ks 1,2,4,8,16,32]
"""

from __future__ import annotations

import sys

from decodebench.engine.profile import main

if __name__ == "__main__":
    main(["--backend", "eager", "--out", "results/benchmarks/verify_curve.json", *sys.argv[1:]])
