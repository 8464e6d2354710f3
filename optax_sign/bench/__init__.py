"""Benchmark CLI of optax_sign (optional extra ``optax-sign[bench]``).

Run ``python -m optax_sign.bench --help`` or the console script
``optax-sign-bench``. Modules: ``data`` (loaders), ``tasks`` (models and
losses), ``optimizers`` (the registry and learning-rate grids), ``runner``
(timed training loops), ``distributed`` (simulated workers under
``shard_map``), ``report`` (table, JSON, plots) and ``cli``.
"""

from optax_sign.bench.cli import main

__all__ = ("main",)
