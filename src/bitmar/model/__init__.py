"""BitMar network components (no IO, no logging).

`BitMar` and `BitMarOutput` load lazily, so `bitmar.config` (which needs only `model_config`) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BitMar", "BitMarOutput"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bitmar.model import bitmar as _bitmar

        return getattr(_bitmar, name)
    raise AttributeError(f"module 'bitmar.model' has no attribute {name!r}")
