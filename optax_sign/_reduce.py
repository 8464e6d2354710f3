"""Global float32 reductions of several trees in one fused pass.

The statistics of ALIAS (sums of products, maxima of magnitudes) are read in
one pass over the gradient and the stored memory: per leaf, every statistic
goes through a single variadic ``lax.reduce``, so XLA fuses the elementwise
producers into it and no parameter-sized intermediate is materialised.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_sign import _communication

_F32 = jnp.float32


def global_reduce(terms: Sequence[tuple], worker_axes: tuple = ()) -> list:
  """Global float32 reductions of several trees in one pass over the leaves.

  Each term is ``("sum", tree)`` or ``("max", tree)`` (the max of nonnegative
  values, 0 for an empty tree); all trees share one structure. Per leaf the
  terms go through a single variadic ``lax.reduce``: XLA fuses the
  elementwise producers into it, so every input leaf is read once and no
  parameter-sized intermediate is materialised (a single-operand sum on CPU
  may instead become a library call whose inputs are materialised).

  Under a fully manual ``shard_map`` a leaf that varies over mesh axes other
  than ``worker_axes`` (a tensor-parallel shard) is one piece of a larger
  leaf: the totals of such leaves are combined over those axes (one ``psum``
  of the sums and one ``pmax`` of the maxima per set of axes), so replicated
  leaves count once and sharded leaves cover every shard.

  Args:
    terms: a sequence of ``(kind, tree)`` pairs.
    worker_axes: the workers' axes, whose statistics stay per worker.

  Returns:
    One float32 scalar per term.
  """
  kinds = tuple(kind for kind, _ in terms)

  def combine(a, b):
    return tuple(x + y if kind == "sum" else jnp.maximum(x, y)
                 for kind, x, y in zip(kinds, a, b))

  zeros = tuple(jnp.zeros([], _F32) for _ in kinds)
  by_shard: dict = {}
  for ops in zip(*(jax.tree.leaves(tree) for _, tree in terms)):
    ops = tuple(x.astype(_F32) for x in ops)
    shard = tuple(a for a in _communication.varying_axes(ops[0])
                  if a not in worker_axes)
    by_shard[shard] = combine(by_shard.get(shard, zeros), jax.lax.reduce(
        ops, tuple(np.float32(0) for _ in ops), combine,
        tuple(range(ops[0].ndim))))
  totals = zeros
  for shard, part in by_shard.items():
    if shard:
      part = combine_shards(kinds, part, shard)
    totals = combine(totals, part)
  return list(totals)


def combine_shards(kinds: tuple, part: tuple, axes: tuple) -> tuple:
  """Sums (``psum``) and maxima (``pmax``) of ``part`` over ``axes``."""
  out = list(part)
  for kind, reduce in (("sum", jax.lax.psum), ("max", jax.lax.pmax)):
    idx = [i for i, k in enumerate(kinds) if k == kind]
    if idx:
      combined = reduce(jnp.stack([part[i] for i in idx]), axes)
      for i, value in zip(idx, jnp.unstack(combined)):
        out[i] = value
  return tuple(out)
