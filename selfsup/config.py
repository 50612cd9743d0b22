"""``python -m selfsup.config [params.yaml]``: check a params file without running anything.

The config engine lives in ``selfsup/core/config.py`` and each section beside its code (``SECTIONS``);
this module is the command (and keeps ``from selfsup.config import load_config`` working for
scripts written against it).
"""
from __future__ import annotations

import sys

from selfsup.core.config import ConfigError, load_config

__all__ = ["ConfigError", "load_config", "main"]


def main(argv: list[str]) -> int:
    try:
        c = load_config(argv[0] if argv else "params.yaml")
    except ConfigError as e:
        sys.exit(f"params: {e}")
    print(f"params: ok ({len(c.methods)} methods: {', '.join(c.methods)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
