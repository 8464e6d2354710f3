"""Packed sign storage: a tree of signs kept as bits, 8 coordinates per byte.

A two-valued sign (ties broken to +-1) needs one plane, ``s > 0``; a ternary
sign (``tie="zero"``) needs a second plane, ``s != 0``.
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_F32 = jnp.float32


class SignBits(NamedTuple):
  """Packed signs of a tree (see ``pack_signs``)."""
  positive: Any  # tree of uint8: s > 0, 8 consecutive elements per byte
  nonzero: Any  # tree of uint8: s != 0 (tie="zero"), else optax.EmptyState()


def bit_layout(shape: Sequence[int]) -> tuple:
  """The shape of an array of ``shape`` packed 8 coordinates per byte.

  Runs of 8 consecutive elements of the last axis share a byte (bit ``k``
  holds element ``8 j + k``); the last axis is padded to a multiple of 8. The
  rank and the other axes are kept, so packed bits keep the array's layout
  (and its sharding where the packed axis divides) and packing and unpacking
  fuse into elementwise passes. A 0-d array packs into a 0-d byte.
  """
  shape = tuple(shape)
  if not shape:
    return ()
  return shape[:-1] + (-(-shape[-1] // 8),)


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean array 8 per byte (uint8, see :func:`bit_layout`)."""
  if mask.ndim == 0:
    return _pack(mask[None])[0]
  pad = (-mask.shape[-1]) % 8
  if pad:
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
  mask = mask.reshape(mask.shape[:-1] + (mask.shape[-1] // 8, 8))
  # A reduction, which XLA does not fuse into its consumers: the update then
  # reads the packed bits, not the gradient again.
  return jnp.sum(mask.astype(jnp.uint8) << np.arange(8, dtype=np.uint8),
                 axis=-1, dtype=jnp.uint8)


def _unpack(bits: jax.Array, like: jax.Array) -> jax.Array:
  """The boolean array of ``like``'s shape packed by :func:`_pack`."""
  if like.ndim == 0:
    return _unpack(bits[None], like[None])[0]
  mask = (bits[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  mask = mask.reshape(bits.shape[:-1] + (8 * bits.shape[-1],))
  return mask[..., :like.shape[-1]] != 0


def zero_signs(params: Any, tie: str) -> SignBits:
  """Packed all-zero planes for a tree like ``params`` (laid out, and on an
  Explicit mesh sharded, as ``pack_signs`` lays out its planes)."""
  zeros = lambda x: _pack(jnp.zeros_like(x, dtype=bool))
  return SignBits(
      positive=jax.tree.map(zeros, params),  # separate buffers: states may
      nonzero=(jax.tree.map(zeros, params)   # be donated
               if tie == "zero" else optax.EmptyState()))


def pack_signs(signs: Any, tie: str) -> SignBits:
  """Packs a tree of signs: the positive plane, and the nonzero plane for
  ``tie="zero"``."""
  positive = jax.tree.map(lambda s: _pack(s > 0), signs)
  if tie != "zero":
    return SignBits(positive, optax.EmptyState())
  return SignBits(positive, jax.tree.map(lambda s: _pack(s != 0), signs))


def _laid_out_like(y: jax.Array, x: Any) -> jax.Array:
  """``y`` with ``x``'s Explicit sharding: the bits of a leaf sharded along a
  last axis that the packing does not divide are replicated."""
  want = getattr(jax.typeof(x), "sharding", None)
  if (want is None or want.mesh.empty
      or jax.typeof(y).sharding.spec == want.spec):
    return y
  return jax.sharding.reshard(y, want)


def unpack_signs(bits: SignBits, like: Any) -> Any:
  """The float32 tree of signs stored by ``pack_signs``.

  ``bits`` and ``like`` are matched leaf by leaf (in order), so wrapped trees
  (Flax ``Param`` vs ``OptVariable``) combine; the result has ``like``'s
  structure.
  """
  leaves, treedef = jax.tree.flatten(like)
  positive = jax.tree.leaves(bits.positive)
  ternary = not isinstance(bits.nonzero, optax.EmptyState)
  nonzero = jax.tree.leaves(bits.nonzero) if ternary else [None] * len(leaves)

  def one(p, x, nz):
    s = jnp.where(_unpack(p, x), 1.0, -1.0).astype(_F32)
    s = s if nz is None else jnp.where(_unpack(nz, x), s, 0.0)
    return _laid_out_like(s, x)

  return jax.tree.unflatten(
      treedef, [one(p, x, nz) for p, x, nz in zip(positive, leaves, nonzero)])
