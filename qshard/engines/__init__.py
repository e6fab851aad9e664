"""Engines spread one training step over processes behind one small protocol (see `base.Engine`)."""

from __future__ import annotations

from qshard.engines.base import Engine


def create_engine(engine: str, **options) -> Engine:
    """The engine named by `distributed.engine` (the compatibility table has already approved it)."""
    if engine == "none":
        from qshard.engines.single import SingleEngine

        return SingleEngine(**options)
    raise NotImplementedError(engine)  # unreachable: compat.check refuses engines not built yet
