r"""The shard-aligned majority vote, for parameters sharded over the workers.

With FSDP / ZeRO over the workers' axis, worker :math:`j` holds the
:math:`j`-th of :math:`N` blocks of each sharded leaf (along its leading
axis) and computes a full-size gradient :math:`g_i` from the gathered
parameters. One all-to-all hands worker :math:`j` every worker's packed signs
of block :math:`j`; it counts them and keeps the vote of its own block,

.. math::
  V^{(j)} = \operatorname{tsign}_T\Big(\sum_i a_i
      \operatorname{tsign}_T\big(g_i^{(j)}\big)\Big),

the update of the shard it holds. Nothing is gathered afterwards: each worker
sends :math:`(N-1)/N \cdot c/8` bytes per parameter (:math:`c` = 1 bit plane
for a two-valued tie policy, 2 for ``tie="zero"``), half the bytes of the
replicated vote's all-to-all and all-gather. Leaves that every worker holds
whole (a replicated bias) take the replicated vote (:func:`vote_signs`).
"""

from typing import Any, List, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_sign import _checks
from optax_sign import _communication as _c
from optax_sign import _sharding

AxisName = _c.AxisName


def _split(tree: Any, params: Any, n: int) -> Tuple[List[int], List[int]]:
  """Indices of the leaves sharded along their leading axis, and of whole
  leaves; raises for a leaf whose shapes fit neither."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  shards = jax.tree.leaves(params)
  if len(leaves) != len(shards):
    raise ValueError(f"updates has {len(leaves)} leaves, params has "
                     f"{len(shards)}")
  sharded, whole = [], []
  for i, ((path, g), p) in enumerate(zip(leaves, shards)):
    g_shape, p_shape = jnp.shape(g), jnp.shape(p)
    if g_shape == p_shape:
      whole.append(i)
    elif (g_shape and p_shape and g_shape[1:] == p_shape[1:]
          and g_shape[0] == n * p_shape[0]):
      sharded.append(i)
    else:
      raise ValueError(
          f"updates{jax.tree_util.keystr(path)} has shape {g_shape} and its "
          f"parameter shard {p_shape}: with {n} workers a sharded leaf's "
          "gradient is N times its shard along the leading axis, a whole "
          "leaf's has the parameter's shape")
  return sharded, whole


def _own_block_vote(rows: jax.Array, axis_name: AxisName, n: int, tie: str,
                    alive: Optional[jax.Array]) -> jax.Array:
  """The vote on this worker's row of ``rows`` [N, L] (int8 signs, row k for
  worker k) after one all-to-all of the packed rows."""
  c, length = _c.planes(tie), rows.shape[1]
  width = c * -(-length // 8)  # packed bytes per row
  rows = jnp.pad(rows, ((0, 0), (0, 8 // c * width - length)))
  packed = _c.pack_lanes([rows[:, j * width:(j + 1) * width]
                          for j in range(8 // c)], tie)
  received = lax.all_to_all(packed, axis_name, 0, 0, tiled=True)
  weights = _c.worker_weights(alive, axis_name, n, tie)
  count = _c.count_gathered(received, length, tie, _c.count_dtype(n), weights)
  return _c.tie_sign_int(count, tie)


def _own_block_votes(leaves: List[Any], axis_name: AxisName, n: int,
                     tie: str, alive: Optional[jax.Array],
                     own: Optional[jax.Array]) -> List[Any]:
  """This worker's block of the vote of each full-size local leaf, one
  all-to-all per group of leaves of one layout (:func:`leaf_groups`)."""
  out = list(leaves)
  live = (_c.live_workers(axis_name, n, alive, own)
          if alive is not None and tie != "zero" else None)
  for group in _c.leaf_groups(leaves):
    rows = jnp.concatenate([
        _c.masked(_c.tie_sign_int(leaves[i], tie), own).reshape(n, -1)
        for i in group], axis=1)
    vote = _own_block_vote(rows, axis_name, n, tie, alive)
    if live is not None:  # no voter: no step
      vote = jnp.where(live > 0, vote, jnp.int8(0))
    start = 0
    for i in group:
      size = leaves[i].size // n
      out[i] = vote[start:start + size].reshape(
          (leaves[i].shape[0] // n,) + leaves[i].shape[1:]).astype(
              leaves[i].dtype)
      start += size
  return out


def vote_signs_sharded(tree: Any, params: Any, axis_name: AxisName, *,
                       tie: str = "zero",
                       alive: Optional[jax.Array] = None) -> Any:
  r"""Majority vote of full-size gradients onto the shards each worker owns.

  Args:
    tree: this worker's full-size pytree :math:`g_i` (gradients with respect
      to the gathered parameters, see :func:`per_worker`).
    params: this worker's parameter shards: a leaf of shape
      :math:`(d_0/N, \dots)` is sharded along its leading axis (worker
      :math:`j` holds block :math:`j`); a leaf of the gradient's shape is held
      whole by every worker.
    axis_name: the workers' axis, bound by ``shard_map``.
    tie: ``"zero"``, ``"positive"`` or ``"negative"``.
    alive: optional alive mask, as in :func:`vote_signs`.

  Returns:
    A pytree shaped like ``params`` with values in {-1, 0, +1}: this
    worker's block of the vote for sharded leaves, the whole vote for whole
    leaves (0 everywhere when no worker is alive).
  """
  _checks.check_tie(tie)
  if axis_name is None:
    raise ValueError("vote_signs_sharded needs the workers' axis_name")
  n = _c.axis_size(axis_name)
  sharded, whole = _split(tree, params, n)
  leaves, treedef = jax.tree.flatten(tree)
  out: List[Any] = list(leaves)
  if whole:
    votes = _c.vote_signs([leaves[i] for i in whole], axis_name, tie=tie,
                          alive=alive)
    for i, v in zip(whole, votes):
      out[i] = v
  if sharded:
    blocks = _sharding.on_local_shards(
        lambda ls, flags: _own_block_votes(ls, axis_name, n, tie, *flags),
        [leaves[i] for i in sharded], _c.alive_flags(alive, axis_name, n))
    for i, v in zip(sharded, blocks):
      out[i] = v
  return jax.tree.unflatten(treedef, out)


def sharded_vote_bytes(tree: Any, params: Any, num_workers: int,
                       tie: str = "zero") -> float:
  """Bytes one worker sends per :func:`vote_signs_sharded` (ring model)."""
  _checks.check_int("num_workers", num_workers, 1)
  _checks.check_tie(tie)
  n, leaves = num_workers, jax.tree.leaves(tree)
  sharded, whole = _split(tree, params, n)
  length = sum(leaves[i].size // n for i in sharded)
  total = (n - 1) * _c.planes(tie) * -(-length // 8) if sharded else 0.0
  if whole:
    size = sum(leaves[i].size for i in whole)
    chosen = _c.choose_transport("auto", n, size, tie)
    total += _c.vote_bytes(chosen, n, size, tie)
  return float(total)


def sharded_majority_vote(axis_name: AxisName, tie: str = "zero"
                          ) -> optax.GradientTransformationExtraArgs:
  r"""Majority vote for FSDP / ZeRO over the workers' axis.

  Inside ``jax.shard_map`` over ``axis_name`` with parameters sharded along
  their leading axis over it, ``update(grads, state, params)`` takes each
  worker's full-size gradients and returns the vote of the block of each leaf
  this worker holds (:func:`vote_signs_sharded`), so parameters and optimizer
  state stay sharded; whole leaves get the whole vote. Follow it by
  ``optax.scale_by_learning_rate``.

  Args:
    axis_name: the workers' axis name.
    tie: tie policy for local zeros and tied votes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`SignAggregationState`; ``update`` needs ``params`` (the shards)
    and accepts ``alive=``.

  Example:
    >>> tx = optax.chain(sharded_majority_vote("data", tie="positive"),
    ...                  optax.scale_by_learning_rate(1e-3))
  """
  _checks.check_tie(tie)
  if axis_name is None:
    raise ValueError("sharded_majority_vote needs the workers' axis_name")

  def init_fn(params):
    _checks.check_float_params(params)
    return _c.SignAggregationState(count=jnp.zeros((), jnp.int32),
                                   bytes_sent=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sharded_majority_vote needs the parameter shards: "
                       "call update(grads, state, params)")
    _checks.warn_misspelled(extra_args)
    out = vote_signs_sharded(updates, params, axis_name, tie=tie,
                             alive=extra_args.get("alive"))
    per_step = sharded_vote_bytes(updates, params, _c.axis_size(axis_name),
                                  tie)
    count = optax.safe_increment(state.count)
    return out, _c.SignAggregationState(
        count=count, bytes_sent=count.astype(jnp.float32) * per_step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
