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
  """Packed signs of a tree (see :func:`pack_signs`)."""
  positive: Any  # tree of uint8: s > 0, 8 consecutive elements per byte
  nonzero: Any  # tree of uint8: s != 0 (tie="zero"), else optax.EmptyState()


def bit_layout(shape: Sequence[int]) -> tuple:
  """Shapes used to pack an array of ``shape`` 8 bits per byte.

  Runs of 8 consecutive elements of the last axis share a byte (bit ``k``
  holds element ``8 j + k``), so packing and unpacking keep the array's
  layout and fuse into elementwise passes. Without a last axis whose length
  is a multiple of 8 the array is flattened and padded first.

  Returns:
    ``(bits_shape, padded)``: the shape of the packed uint8 array and whether
    the array is flattened and padded.
  """
  shape = tuple(shape)
  if shape and shape[-1] % 8 == 0:
    return shape[:-1] + (shape[-1] // 8,), False
  return (-(-int(np.prod(shape, dtype=np.int64)) // 8),), True


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean array 8 per byte (uint8, see :func:`bit_layout`)."""
  bits_shape, padded = bit_layout(mask.shape)
  if padded:
    mask = jnp.pad(mask.reshape(-1), (0, 8 * bits_shape[0] - mask.size))
  mask = mask.reshape(bits_shape + (8,)).astype(jnp.uint8)
  # A reduction, which XLA does not fuse into its consumers: the update then
  # reads the packed bits, not the gradient again.
  return jnp.sum(mask << np.arange(8, dtype=np.uint8), axis=-1,
                 dtype=jnp.uint8)


def _unpack(bits: jax.Array, like: jax.Array) -> jax.Array:
  """The boolean array of ``like``'s shape packed by :func:`_pack`."""
  _, padded = bit_layout(like.shape)
  mask = (bits[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  if padded:
    return mask.reshape(-1)[:like.size].reshape(like.shape) != 0
  return mask.reshape(like.shape) != 0


def zero_signs(params: Any, tie: str) -> SignBits:
  """Packed all-zero planes for a tree like ``params``."""
  zeros = lambda x: jnp.zeros(bit_layout(x.shape)[0], jnp.uint8)
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


def unpack_signs(bits: SignBits, like: Any) -> Any:
  """The float32 tree of signs stored by :func:`pack_signs`.

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
    return s if nz is None else jnp.where(_unpack(nz, x), s, 0.0)

  return jax.tree.unflatten(
      treedef, [one(p, x, nz) for p, x, nz in zip(positive, leaves, nonzero)])
