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

  The last axis is padded to a multiple of 8 and packed 8 to 1; the rank and
  the other axes are kept, so packed bits keep the array's layout (and its
  sharding where the packed axis divides) and packing and unpacking are
  elementwise passes. A 0-d array packs into a 0-d byte. The order of the
  bits within a run of bytes is :func:`run_length`'s.
  """
  shape = tuple(shape)
  if not shape:
    return ()
  return shape[:-1] + (-(-shape[-1] // 8),)


def run_length(x: jax.Array) -> int:
  """B, the run of consecutive coordinates that one bit position covers.

  The last axis is cut into blocks of ``8 B`` consecutive coordinates; bit
  ``k`` of byte ``j`` of block ``c`` holds coordinate ``8 B c + B k + j``
  (``0 <= j < B``). B is the largest power of two up to 32 with ``8 B``
  dividing the length of the last axis on each shard (1, i.e. 8 consecutive
  coordinates per byte, for a length that is not a multiple of 16), so a leaf
  sharded along its last axis on an Explicit mesh packs on its own shards;
  everywhere else B follows the shape alone. Runs of B coordinates let the
  unpacking feed vectorised reductions (see :func:`signed_sums`).
  """
  length = x.shape[-1]
  shards = _last_axis_shards(x)
  if length % shards == 0:
    length //= shards
  for b in (32, 16, 8, 4, 2):
    if length % (8 * b) == 0:
      return b
  return 1


def _last_axis_shards(x: jax.Array) -> int:
  """How many shards an Explicit sharding cuts the last axis into (else 1)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if sharding is None or sharding.mesh.empty or not sharding.spec:
    return 1
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  axes = spec[-1]
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def _blocks(x: jax.Array, run: int) -> jax.Array:
  """``x`` with its last axis (a multiple of ``8 run``) split into
  [blocks, 8, run]."""
  return x.reshape(x.shape[:-1] + (x.shape[-1] // (8 * run), 8, run))


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean array 8 per byte (uint8, see :func:`bit_layout`)."""
  if mask.ndim == 0:
    return _pack(mask[None])[0]
  run = run_length(mask)
  pad = (-mask.shape[-1]) % 8
  if pad:
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
  shifts = np.arange(8, dtype=np.uint8)[:, None]
  # A reduction, which XLA does not fuse into its consumers: the update then
  # reads the packed bits, not the gradient again.
  packed = jnp.sum(_blocks(mask, run).astype(jnp.uint8) << shifts, axis=-2,
                   dtype=jnp.uint8)
  return packed.reshape(mask.shape[:-1] + (mask.shape[-1] // 8,))


def _unpack(bits: jax.Array, like: jax.Array) -> jax.Array:
  """The boolean array of ``like``'s shape packed by :func:`_pack`."""
  if like.ndim == 0:
    return _unpack(bits[None], like[None])[0]
  length = like.shape[-1]
  run = run_length(like)
  runs = bits.reshape(bits.shape[:-1] + (bits.shape[-1] // run, 1, run))
  mask = (runs >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)
  mask = mask.reshape(bits.shape[:-1] + (8 * bits.shape[-1],))
  return mask[..., :length] != 0


def _salted(values: np.ndarray, salt: int, last_eps: float) -> np.ndarray:
  """``values`` with ``salt * last_eps`` added to its last entry.

  XLA:CPU materialises a broadcast constant that the vectorised reductions
  of several leaves share (identical constants of identical shapes are
  merged); a different, harmless offset per leaf keeps them apart.
  """
  values = values.copy()
  values[-1] += np.float32(salt % 2**15) * np.float32(last_eps)
  return values


def _plane(bits: jax.Array, run: int, salt: int) -> jax.Array:
  """The 0/1 float32 planes packed by :func:`_pack`, as [..., blocks, 8, B]
  (``B = run``, :func:`run_length`), the last axis padded to a multiple of 8.

  Bit ``k`` of a byte ``b`` is ``floor(b 2^-k) - 2 floor(b 2^-(k+1))`` in
  float32: products, floors and broadcasts only, which XLA:CPU fuses into its
  vectorised (YNNPACK) reductions, where the shifts and the select of
  :func:`_unpack` make it materialise the unpacked array first (an
  elementwise pass is faster with those). Offsets below ``2^-15`` on the
  ``2^-7`` and ``2^-8`` factors (``salt``) leave every floor unchanged.
  """
  b = bits.astype(_F32).reshape(
      bits.shape[:-1] + (bits.shape[-1] // run, 1, run))
  powers = np.float32(0.5) ** np.arange(9, dtype=np.float32)
  whole = jnp.floor(b * _salted(powers[:8], salt, 2.0**-30)[:, None])
  half = jnp.floor(b * _salted(powers[1:], salt, 2.0**-31)[:, None])
  return whole - half - half


def _blocked_sum(x: jax.Array, bits: jax.Array, salt: int) -> jax.Array:
  """``sum(x * plane)`` for one leaf and one packed plane.

  The product is taken in the blocked view of ``x`` (a free reshape), which
  XLA:CPU reduces several times faster than the plane reshaped like ``x``.
  """
  if x.ndim == 0:
    return _blocked_sum(x[None], bits[None], salt)
  run = run_length(x)
  if x.shape[-1] % 8:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (-x.shape[-1]) % 8)])
  return jnp.sum(_blocks(x, run) * _plane(bits, run, salt))


def signed_sums(bits: SignBits, tree: Any, salt: int = 0) -> list:
  """The per-leaf float32 inner products ``<x, s>`` of ``tree`` with the signs
  stored in ``bits``, as vectorised reductions that read the packed bits.

  With the positive plane ``p`` and the nonzero plane ``z``, ``s = 2 p - z``
  (``p`` implies ``z``; ``z = 1`` for a two-valued sign), so
  ``<x, s> = 2 <x, p> - <x, z>``: one plane per reduction. Calls in one
  program take different ``salt`` (multiples of 4096; see :func:`_salted`).
  """
  leaves = jax.tree.leaves(tree)
  positive = jax.tree.leaves(bits.positive)
  ternary = not isinstance(bits.nonzero, optax.EmptyState)
  nonzero = jax.tree.leaves(bits.nonzero) if ternary else [None] * len(leaves)
  sums = []
  for i, (x, p, nz) in enumerate(zip(leaves, positive, nonzero)):
    x = x.astype(_F32)
    on = jnp.sum(x) if nz is None else _blocked_sum(x, nz, salt + i + 2**14)
    sums.append(2.0 * _blocked_sum(x, p, salt + i) - on)
  return sums


def zero_signs(params: Any, tie: str) -> SignBits:
  """Packed all-zero planes for a tree like ``params`` (laid out, and on an
  Explicit mesh sharded, as ``pack_signs`` lays out its planes)."""
  zeros = lambda x: _pack(jnp.zeros_like(x, dtype=bool))
  return SignBits(
      positive=jax.tree.map(zeros, params),  # separate buffers: states may
      nonzero=(jax.tree.map(zeros, params)   # be donated
               if tie == "zero" else optax.EmptyState()))


def check_layout(bits: SignBits, updates: Any) -> None:
  """Raises ``ValueError`` if ``updates`` cannot be the arrays ``bits`` were
  packed for (by leaf count and :func:`bit_layout`).

  Packed bits do not record the length of the last axis within a byte (4 and
  8 coordinates pack alike); the caller also checks against ``params``.
  """
  stored = [b.shape for b in jax.tree.leaves(bits.positive)]
  shapes = [tuple(jnp.shape(u)) for u in jax.tree.leaves(updates)]
  if stored != [bit_layout(s) for s in shapes]:
    raise ValueError(
        f"updates of shapes {shapes} do not fit the packed signs kept since "
        f"init (packed shapes {stored}): the updates must have the shapes of "
        "the parameters given to init")


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
  """The float32 tree of signs stored by ``pack_signs`` (for sums of
  products with them, :func:`signed_sums` is faster).

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
