r"""Aggregation of signs across workers: majority vote and mean of signs.

Every worker ``i`` on a named axis holds a local direction :math:`v_i` (its
gradient, a momentum, any earlier output of a chain) and sends only its sign
:math:`q_i = \operatorname{tsign}_T(v_i)`. The count
:math:`S = \sum_i a_i q_i \in [-N, N]` (with an optional alive mask
:math:`a_i \in \{0, 1\}`) is formed with integer arithmetic by one of three
transports that give bitwise-identical results:

* ``"psum"``: all-reduce of :math:`a_i q_i` in the narrowest signed integer that
  holds :math:`\pm N` (int8 while :math:`N \le 127`, then int16, then int32).
* ``"allgather"``: the signs packed into bits (one a sign, two with
  ``tie="zero"``) are all-gathered and every worker counts locally.
* ``"alltoall"``: the packed signs are exchanged by all-to-all so that each
  worker counts and votes on its own :math:`1/N` of the coordinates, then the
  packed vote is all-gathered.

``"auto"`` picks by a cost model per backend (:func:`select_transport`):
the fewest bytes on the wire (:func:`vote_bytes`) on GPU and TPU, the
measured fastest on CPU devices (by vector size: psum, allgather, alltoall).
The
leaves of a pytree are flattened into one vector per group of leaves that vary
over the same mesh axes (:func:`leaf_groups`), so each transport runs one
collective per phase and group whatever the number of leaves: one group for
data parallelism, two for a tensor-parallel tree whose biases and norm scales
are replicated over the model axis. Where other mesh axes are Auto (layouts
unknown inside ``jit``), ``"auto"`` is ``"psum"``, run leaf by leaf.

**The shard_map gradient trap.** Under ``jax.shard_map`` (with the default
``check_vma=True``), ``jax.grad`` with respect to parameters that entered
replicated (``in_specs=P()``) returns gradients that XLA has *already summed
across workers in float32*, which silently defeats the compression. Mark the
parameters per worker before differentiating, with :func:`per_worker`, or pass
them with a per-worker spec, or use ``check_vma=False``. ``pmap`` and named
``vmap`` give per-worker gradients without help.
"""

import math
from typing import Any, Hashable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_sign import _checks
from optax_sign import _sharding

AxisName = Union[Hashable, Tuple[Hashable, ...]]

TRANSPORTS = ("auto", "psum", "allgather", "alltoall")
_COUNT_TRANSPORTS = ("auto", "psum", "allgather")  # those that deliver S


def axis_size(axis_name: AxisName) -> int:
  """The number of workers on ``axis_name`` (1 for ``None``), at trace time.

  Raises:
    ValueError: if ``axis_name`` is not bound by an enclosing ``shard_map``,
      ``pmap`` or ``vmap(..., axis_name=...)``.
  """
  if axis_name is None:
    return 1
  try:
    return int(lax.axis_size(axis_name))
  except (NameError, KeyError) as err:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here. Call this inside "
        "jax.shard_map (a mesh axis name), jax.pmap(..., axis_name=...) or "
        "jax.vmap(..., axis_name=...) with that name, or pass axis_name=None "
        "for a single worker.") from err


def count_dtype(num_workers: int) -> jnp.dtype:
  """The narrowest signed integer dtype that holds every count in [-N, N]."""
  for dtype in (jnp.int8, jnp.int16, jnp.int32):
    if num_workers <= jnp.iinfo(dtype).max:
      return jnp.dtype(dtype)
  raise ValueError(
      f"{num_workers} workers exceed the int32 range of the vote count")


def planes(tie: str) -> int:
  """Bit planes per coordinate: 2 when a sign may be 0, else 1."""
  return 2 if tie == "zero" else 1


def vote_bytes(transport: str, num_workers: int, size: int,
               tie: str = "zero") -> float:
  r"""Bytes one worker sends per vote of ``size`` coordinates (ring model).

  The exact count, padding included, under the ring model of
  ``docs/algorithms/majority_vote.md`` (section "Bytes on the wire"): an
  all-reduce of :math:`B` bytes sends :math:`2(N-1)B/N`, an all-gather of an
  own contribution of :math:`B` bytes sends :math:`(N-1)B` and an all-to-all of
  :math:`B` bytes sends :math:`(N-1)B/N`. The alive mask's few bytes are not
  included.

  Args:
    transport: ``"psum"``, ``"allgather"`` or ``"alltoall"``.
    num_workers: :math:`N \ge 1`.
    size: :math:`d`, the number of coordinates (all leaves together).
    tie: the tie policy (``"zero"`` needs two bit planes).

  Returns:
    Bytes sent per worker, as a float.

  Example:
    Bytes per coordinate for 8 workers and a million coordinates:

    >>> d = 2**20
    >>> vote_bytes("psum", 8, d) / d  # int8 all-reduce, 2 (N - 1) / N
    1.75
    >>> vote_bytes("alltoall", 8, d, tie="positive") / d  # 2 (N - 1) / (8 N)
    0.21875
  """
  _checks.check_int("num_workers", num_workers, 1)
  _checks.check_int("size", size, 0)
  _checks.check_tie(tie)
  n, c = num_workers, planes(tie)
  if transport == "psum":
    return 2.0 * (n - 1) / n * count_dtype(n).itemsize * size
  if transport == "allgather":
    return float((n - 1) * c * -(-size // 8))
  if transport == "alltoall":
    chunk = -(-size // (8 * n))  # bytes per plane per worker after padding
    return (n - 1) / n * c * n * chunk + (n - 1) * c * chunk
  raise ValueError(f"transport must be one of {TRANSPORTS[1:]}, got "
                   f"{transport!r}")


# On CPU devices "auto" runs "psum" below this many coordinates per worker,
# then "allgather", then "alltoall" (see select_transport).
_CPU_ALLGATHER_FROM = 1 << 18
_CPU_ALLTOALL_FROM = 1 << 21


def select_transport(backend: str, num_workers: int, size: int, tie: str,
                     allowed: Sequence[str] = TRANSPORTS) -> str:
  r"""The transport ``"auto"`` runs, from a cost model of ``backend``.

  A pure function of Python values, so the program's structure depends on
  nothing traced.

  * ``"cpu"`` (the devices of one process): a collective is a memory copy
    plus a rendezvous of the device threads, so the passes over the vector
    and the number of collectives and operations weigh as much as the bytes.
    ``"psum"`` below :math:`2^{18}` coordinates per worker, ``"allgather"``
    below :math:`2^{21}`, ``"alltoall"`` from there (``"allgather"`` where
    ``"alltoall"`` is not allowed, as for the mean of signs). Measured with
    ``python -m optax_sign.bench.vote_time`` (N = 2, 4, 8, 16 simulated
    devices on a loaded 2-core machine, both ties; medians as multiples of
    an fp32 ``pmean`` step): at :math:`d \le 10^5` psum 0.9-1.3x, allgather
    1.3-3.3x, alltoall 1.9-4.1x (fixed costs: one collective and two
    elementwise passes against packing, counting and N-piece exchanges); at
    :math:`d = 3 \cdot 10^5` and :math:`10^6` allgather 0.6-1.3x (N <= 8),
    psum 1.1-1.4x, alltoall 0.7-3.8x; at :math:`d = 3 \cdot 10^6` to
    :math:`10^7` alltoall 0.17-0.8x (0.20-0.24x at N = 8, d = 10^7),
    allgather 0.19-1.3x, psum 0.36-1.3x: alltoall counts 1/N of the
    coordinates and moves the fewest bytes.
  * any other backend (``"gpu"``, ``"tpu"``, ``"network"``): bound by the
    interconnect, so the fewest bytes on the wire (:func:`vote_bytes`), ties broken in favour of
    fewer collectives (psum, then allgather, then alltoall).

  :func:`choose_transport` prices CPU devices of several processes (joined
  by a network, as with ``jax.distributed``) by bytes, like GPU and TPU.

  Args:
    backend: ``jax.default_backend()`` of the run.
    num_workers: :math:`N \ge 1`.
    size: coordinates exchanged per worker (one group of leaves).
    tie: the tie policy.
    allowed: the transports to choose from (``"auto"`` is ignored).

  Returns:
    ``"psum"``, ``"allgather"`` or ``"alltoall"``.

  Example:
    >>> select_transport("cpu", 8, 10_000_000, "zero")
    'alltoall'
    >>> select_transport("cpu", 8, 1_000_000, "zero")
    'allgather'
    >>> select_transport("cpu", 8, 100_000, "zero")
    'psum'
    >>> select_transport("gpu", 2, 100_000, "positive")  # a tie on bytes
    'allgather'
  """
  if not isinstance(backend, str):
    raise TypeError(f"backend must be a string such as 'cpu', 'gpu' or "
                    f"'tpu', got {backend!r}")
  _checks.check_int("num_workers", num_workers, 1)
  _checks.check_int("size", size, 0)
  _checks.check_tie(tie)
  candidates = [t for t in allowed if t != "auto"]
  if not candidates or any(t not in TRANSPORTS for t in candidates):
    raise ValueError(f"allowed must name some of {TRANSPORTS[1:]}, got "
                     f"{tuple(allowed)!r}")
  if backend == "cpu":
    if num_workers == 1 or size < _CPU_ALLGATHER_FROM:
      return "psum"
    if size >= _CPU_ALLTOALL_FROM and "alltoall" in candidates:
      return "alltoall"
    return "allgather"
  return min(candidates,
             key=lambda t: (vote_bytes(t, num_workers, size, tie),
                            candidates.index(t)))


def choose_transport(transport: str, num_workers: int, size: int, tie: str,
                     allowed: Sequence[str] = TRANSPORTS) -> str:
  """Resolves ``"auto"`` by :func:`select_transport` for this run's backend.

  CPU devices are priced as ``"cpu"`` (time) only within one process; across
  processes the network carries the bytes, priced as on GPU and TPU. Where
  other mesh axes are Auto (the leaves' layouts over them unknown inside
  ``jit``) it is ``"psum"``, the one elementwise transport: the others
  flatten the leaves, and the compiler reshards them over those axes.
  """
  if transport != "auto":
    return transport
  if _sharding.unknown_layout_axes() and "psum" in allowed:
    return "psum"
  backend = jax.default_backend()
  if backend == "cpu" and jax.process_count() > 1:
    backend = "network"
  return select_transport(backend, num_workers, size, tie, allowed)


def tie_sign_int(x: jax.Array, tie: str) -> jax.Array:
  """tsign_T(x) as int8 (of a value or of an integer count).

  Anything that is neither > 0 nor < 0, NaN included, takes the tie value.
  """
  tie_value = {"zero": 0, "positive": 1, "negative": -1}[tie]
  # Scalars broadcast into x's layout (an unsharded ones array would not).
  return jnp.where(x > 0, jnp.int8(1),
                   jnp.where(x < 0, jnp.int8(-1), jnp.int8(tie_value)))


def _pack(q: jax.Array, tie: str, shape: Tuple[int, ...]) -> jax.Array:
  """Packs int8 signs into the uint8 bytes of ``shape``, c bits a sign.

  For B bytes in all (flat index b), bit j of byte b is (q > 0) of
  coordinate j B + b with one bit plane (c = 1); with ``tie="zero"`` (c = 2)
  bits 2j and 2j + 1 are (q > 0) and (q < 0) of coordinate j B + b; q is
  padded with zeros to 8 B / c. Every bit lane is a contiguous slice of q,
  so packing and unpacking are elementwise passes: no reduction or broadcast
  along a minor axis (as with bytes of 8 neighbours) and no stacking of
  planes (which XLA:CPU fused into the all-to-all's operands as a loop
  several times slower than one plane's).
  """
  c = planes(tie)
  q = jnp.pad(q, (0, 8 // c * math.prod(shape) - q.size))
  return pack_lanes(list(q.reshape((8 // c,) + shape)), tie)


def pack_lanes(lanes: Sequence[jax.Array], tie: str) -> jax.Array:
  """Packs ``8 / c`` equally shaped int8 sign arrays into one uint8 array of
  their shape: lane ``j`` in bit ``j`` (c = 1), or in bits ``2j`` (q > 0) and
  ``2j + 1`` (q < 0) with ``tie="zero"`` (c = 2)."""
  c = planes(tie)
  packed = jnp.zeros(lanes[0].shape, jnp.uint8)
  for j, q in enumerate(lanes):
    packed = packed | ((q > 0).astype(jnp.uint8) << (c * j))
    if c == 2:
      packed = packed | ((q < 0).astype(jnp.uint8) << (2 * j + 1))
  return packed


def _lanes(packed: jax.Array, tie: str, dtype: Any) -> list:
  """The signs in each bit lane of packed bytes (any shape, flattened).

  One pass per lane with a constant shift: a shift by a broadcast iota does
  not vectorise on XLA:CPU (3x slower at d = 1M).
  """
  c, packed = planes(tie), packed.reshape(-1)
  def bit(k):
    return ((packed >> k) & 1).astype(dtype)
  return [bit(k) - bit(k + 1) if c == 2 else 2 * bit(k) - 1
          for k in range(0, 8, c)]


def _unpack(packed: jax.Array, length: int, tie: str,
            dtype: Any) -> jax.Array:
  """Inverse of :func:`_pack`: bytes (any shape) -> signs [length]."""
  return jnp.concatenate(_lanes(packed, tie, dtype))[:length]


def axis_names(axis_name: AxisName) -> Tuple[Hashable, ...]:
  """``axis_name`` as a tuple of names (``()`` for ``None``)."""
  if axis_name is None:
    return ()
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _is_manual(axis_name: AxisName) -> bool:
  """True under ``shard_map``/``pmap`` (manual mesh axes), False under vmap."""
  manual = jax.sharding.get_abstract_mesh().manual_axes
  return all(a in manual for a in axis_names(axis_name))


def gather_invariant(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """All-gather whose result is device-invariant where that type exists.

  ``to="invarying"`` is valid under ``shard_map`` and ``pmap`` but raises
  under a named ``vmap``, where a plain all-gather is used instead.
  """
  if _is_manual(axis_name):
    return lax.all_gather(x, axis_name, to="invarying")
  return lax.all_gather(x, axis_name)


def count_gathered(gathered: jax.Array, length: int, tie: str, dtype: Any,
                    weights: Optional[jax.Array]) -> jax.Array:
  """S = sum_i w_i q_i from the N workers' packed bytes [N, B].

  Per bit lane a static sum of the N unpacked terms, the lanes concatenated:
  XLA fuses it into one elementwise pass with no loop-carried count (exact,
  as every term is an integer).
  """
  def term(i):
    lanes = _lanes(gathered[i], tie, dtype)
    return (lanes if weights is None
            else [q * weights[i].astype(dtype) for q in lanes])
  totals = term(0)
  for i in range(1, gathered.shape[0]):
    totals = [t + q for t, q in zip(totals, term(i))]
  return jnp.concatenate(totals)[:length]


def worker_weights(alive: Optional[jax.Array], axis_name: AxisName,
                    num_workers: int, tie: str) -> Optional[jax.Array]:
  """The alive mask of every worker, needed when packed planes omit zeros.

  With ``tie="zero"`` a dead worker sends all-zero planes and no mask is
  needed. Otherwise only the ``q > 0`` plane travels, so the receivers weight
  worker ``i`` by ``a_i`` (gathered as N bytes when each worker holds its own).
  """
  if alive is None or tie == "zero":
    return None
  if alive.size == num_workers and num_workers > 1:
    return alive.reshape(-1).astype(jnp.int8)
  return gather_invariant(alive.reshape(()).astype(jnp.int8), axis_name)


def _check_alive_shape(alive: jax.Array, axis_name: AxisName,
                       num_workers: int) -> None:
  if alive.size != 1 and alive.shape != (num_workers,):
    raise ValueError(
        "alive must be this worker's flag (a scalar) or a mask of shape "
        f"({num_workers},) over the workers of axis_name={axis_name!r}; got "
        f"shape {alive.shape}")


def varying_axes(x: jax.Array) -> Tuple[Hashable, ...]:
  """The mesh axes ``x`` varies over under ``shard_map`` (sorted; () elsewhere)."""
  return tuple(sorted(jax.typeof(x).mat.varying, key=str))


def leaf_groups(leaves: Sequence[jax.Array]) -> list:
  """Indices of ``leaves`` grouped by the mesh axes each leaf varies over.

  Inside a fully manual ``shard_map`` a tensor-parallel tree mixes leaves that
  vary over ``("data", "model")`` with replicated ones (biases, norm scales)
  that vary over ``("data",)`` only; one concatenated vector would vary over
  the union and could not be returned replicated. Each group is exchanged in
  its own collective. Outside ``shard_map`` there is one group.
  """
  groups: dict = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(varying_axes(leaf), []).append(i)
  return list(groups.values())


def _signs_of(leaves: Sequence[jax.Array], tie: str) -> jax.Array:
  """The int8 signs of one group of leaves, concatenated into a vector."""
  return jnp.concatenate([tie_sign_int(v.ravel(), tie) for v in leaves])


def _exchange(tree, axis_name, tie, transport, alive, allowed, combine):
  """Validates, then runs ``combine(q, n, transport, alive)`` on each group.

  ``q`` is the group's int8 sign vector (zeroed for a dead worker) and the
  result, a vector of ``q``'s length, is cut back into the group's leaves in
  their dtypes. Without ``axis_name``, and for the elementwise ``"psum"``
  where other mesh axes are Auto (the leaves' layouts over them unknown
  inside ``jit``), each leaf is combined as it is: no flattening, so sharded
  leaves keep their layout and nothing is resharded.
  """
  _checks.check_tie(tie)
  _checks.check_choice("transport", transport, allowed)
  n = axis_size(axis_name)
  alive, own = alive_flags(alive, axis_name, n)
  leaves, treedef = jax.tree.flatten(tree)
  by_leaf = lambda v, chosen: combine(masked(tie_sign_int(v, tie), own), n,
                                      chosen, alive, own).astype(v.dtype)
  if axis_name is None:  # no collective: leaf by leaf, layouts kept
    return treedef.unflatten([by_leaf(v, "psum") for v in leaves])
  unknown = _sharding.unknown_layout_axes()

  def by_group(leaves, shared):
    alive, own = shared
    out = list(leaves)
    for group in leaf_groups(leaves):
      size = sum(leaves[i].size for i in group)
      chosen = choose_transport(transport, n, size, tie, allowed)
      if chosen == "psum" and unknown:  # elementwise: each leaf's layout kept
        for i in group:
          out[i] = by_leaf(leaves[i], chosen)
        continue
      q = masked(_signs_of([leaves[i] for i in group], tie), own)
      flat, start = combine(q, n, chosen, alive, own), 0
      for i in group:
        v = leaves[i]
        out[i] = flat[start:start + v.size].reshape(v.shape).astype(v.dtype)
        start += v.size
    return out

  return treedef.unflatten(
      _sharding.on_local_shards(by_group, leaves, (alive, own)))


def alive_flags(alive: Optional[jax.Array], axis_name: AxisName,
                num_workers: int) -> Tuple[Optional[jax.Array],
                                           Optional[jax.Array]]:
  """The checked ``alive`` argument and this worker's own boolean flag.

  ``alive`` is this worker's flag (a scalar) or a mask of shape ``(N,)``
  replicated on every worker; ``(None, None)`` without one.
  """
  if alive is None:
    return None, None
  alive = jnp.asarray(alive)
  _check_alive_shape(alive, axis_name, num_workers)
  own = (alive.reshape(()) if alive.size == 1
         else alive[lax.axis_index(axis_name)]).astype(bool)
  return alive, own


def masked(q: jax.Array, own: Optional[jax.Array]) -> jax.Array:
  """The signs ``q`` of this worker, zeroed if it is dead (``own`` False)."""
  return q if own is None else jnp.where(own, q, jnp.int8(0))


def group_sizes(tree: Any) -> list:
  """Coordinates each worker exchanges per group of ``tree``: its local
  shards, grouped as :func:`leaf_groups` groups them (also where
  :func:`optax_sign._sharding.on_local_shards` makes the shards local)."""
  free = _sharding.free_explicit_axes()
  mesh = jax.sharding.get_abstract_mesh()
  sizes: dict = {}
  for leaf in jax.tree.leaves(tree):
    spec_axes = [a for entry in _sharding.spec_of(leaf) if entry is not None
                 for a in (entry if isinstance(entry, tuple) else (entry,))
                 if a in free]
    key = tuple(sorted(set(varying_axes(leaf)) | set(spec_axes), key=str))
    local = leaf.size // max(1, math.prod(mesh.shape[a] for a in spec_axes))
    sizes[key] = sizes.get(key, 0) + local
  return list(sizes.values())


def _count(q, axis_name, n, tie, transport, alive):
  """S = sum_i a_i q_i by ``"psum"`` or ``"allgather"``, in the count dtype."""
  dtype = count_dtype(n)
  if axis_name is None:
    return q.astype(dtype)
  if transport == "psum":
    return lax.psum(q.astype(dtype), axis_name)
  weights = worker_weights(alive, axis_name, n, tie)
  packed = _pack(q, tie, (planes(tie) * -(-q.size // 8),))
  gathered = gather_invariant(packed, axis_name)
  return count_gathered(gathered, q.size, tie, dtype, weights)


def _vote_alltoall(q, axis_name, n, tie, alive):
  """Count and vote on an own chunk after an all-to-all; gather the vote.

  The packed bytes are laid out [n, c * chunk] from the start, so neither the
  exchange nor the unpacking of the gathered vote transposes.
  """
  chunk = -(-q.size // (8 * n))  # packed bytes per plane per worker
  shape = (planes(tie) * chunk,)
  received = lax.all_to_all(_pack(q, tie, (n,) + shape), axis_name, 0, 0,
                            tiled=True)
  weights = worker_weights(alive, axis_name, n, tie)
  count = count_gathered(received, 8 * chunk, tie, count_dtype(n), weights)
  vote = _pack(tie_sign_int(count, tie), tie, shape)
  return _unpack(gather_invariant(vote, axis_name), q.size, tie, jnp.int8)


def vote_signs(tree: Any, axis_name: Optional[AxisName], *,
               tie: str = "zero", transport: str = "auto",
               alive: Optional[jax.Array] = None) -> Any:
  r"""Majority vote of signs across the workers of ``axis_name``.

  .. math::
    V = \operatorname{tsign}_T\Big(\sum_i a_i\,
        \operatorname{tsign}_T(v_i)\Big),

  computed with integer arithmetic only; every worker gets the same
  :math:`V`, leaf by leaf in the input dtypes. One tie policy :math:`T` governs
  the local zeros and the tied votes.

  Non-finite inputs: a NaN coordinate is sent as the tie value, so the vote
  itself stays finite and identical everywhere. Do not wrap a communicating
  chain in ``optax.apply_if_finite``: it decides per worker, so the workers
  would part ways (and under ``shard_map`` a skipping worker would not join
  the collective). Drop a worker whose gradient is not finite with the alive
  mask instead, ``alive=all(isfinite(g))`` (this worker's flag): every worker
  then applies the same vote of the others.

  Args:
    tree: this worker's pytree :math:`v_i` of arrays.
    axis_name: the named axis of the workers (a name or a tuple of names), or
      ``None`` for one worker and no collective.
    tie: ``"zero"`` (zeros abstain; two bit planes), ``"positive"`` or
      ``"negative"``.
    transport: ``"auto"``, ``"psum"``, ``"allgather"`` or ``"alltoall"``.
    alive: optional alive mask: this worker's boolean flag (a scalar), or a
      boolean vector of length :math:`N` replicated on every worker. A dead
      worker abstains; with no live worker the vote is 0 (no step) whatever
      the tie policy.

  Returns:
    A pytree like ``tree`` with values in {-1, 0, +1} (0 only for
    ``tie="zero"`` or when no worker is alive), identical on every worker.

  Raises:
    ValueError: for an unknown ``tie`` or ``transport``, an ``axis_name`` not
      bound by ``shard_map``/``pmap``/``vmap``, or a badly shaped ``alive``.

  Example:
    Three workers simulated by a named ``jax.vmap``:

    >>> g = jnp.array([[1.0, -2.0, 0.0],    # worker 0
    ...                [3.0, -1.0, 0.0],    # worker 1
    ...                [-1.0, -1.0, 2.0]])  # worker 2
    >>> votes = jax.vmap(lambda v: vote_signs(v, "i"), axis_name="i")(g)
    >>> print(votes)  # the same vote on every worker
    [[ 1. -1.  1.]
     [ 1. -1.  1.]
     [ 1. -1.  1.]]

  References:
    Bernstein et al., "signSGD with Majority Vote is Communication Efficient
    and Fault Tolerant", ICLR 2019 (arXiv 1810.05291).
  """
  def combine(q, n, chosen, alive, own):
    if chosen == "alltoall" and axis_name is not None:
      vote = _vote_alltoall(q, axis_name, n, tie, alive)
    else:
      vote = tie_sign_int(_count(q, axis_name, n, tie, chosen, alive), tie)
    if alive is None or tie == "zero":  # tie="zero": no voter gives S = 0
      return vote
    # A two-valued tie would turn S = 0 into a full step on no information.
    return jnp.where(live_workers(axis_name, n, alive, own) > 0, vote, jnp.int8(0))

  return _exchange(tree, axis_name, tie, transport, alive, TRANSPORTS, combine)


def mean_signs(tree: Any, axis_name: Optional[AxisName], *,
               tie: str = "zero", transport: str = "auto",
               alive: Optional[jax.Array] = None) -> Any:
  r"""Mean of the workers' signs, :math:`M = S / \sum_i a_i` (0 if none alive).

  .. math::
    M = \frac{\sum_i a_i \operatorname{tsign}_T(v_i)}{\sum_i a_i}
    \in [-1, 1],

  not re-signed; computed in float32 and returned in the input dtypes. The
  count travels by ``"psum"`` or ``"allgather"`` (``"alltoall"`` moves votes,
  not counts, and is refused).

  Args:
    tree: this worker's pytree :math:`v_i` of arrays.
    axis_name: the named axis of the workers (a name or a tuple of names), or
      ``None`` for one worker and no collective.
    tie: tie policy :math:`T` for local zeros: ``"zero"`` (zeros abstain),
      ``"positive"`` or ``"negative"``.
    transport: ``"auto"``, ``"psum"`` or ``"allgather"``.
    alive: optional alive mask: this worker's boolean flag (a scalar), or a
      boolean vector of length :math:`N` replicated on every worker. A dead
      worker abstains and is not counted in the denominator.

  Returns:
    A pytree like ``tree`` with values in :math:`[-1, 1]` (multiples of
    :math:`1/\sum_i a_i`), identical on every worker.

  Raises:
    ValueError: for an unknown ``tie``, ``transport="alltoall"``, an
      ``axis_name`` not bound by ``shard_map``/``pmap``/``vmap``, or a badly
      shaped ``alive``.

  Example:
    >>> g = jnp.array([[1.0, -2.0, 0.0],    # worker 0
    ...                [3.0, -1.0, 0.0],    # worker 1
    ...                [-1.0, -1.0, 2.0]])  # worker 2
    >>> mean = jax.vmap(lambda v: mean_signs(v, "i"), axis_name="i")(g)
    >>> print(np.round(mean[0], 3))  # worker 0's copy
    [ 0.333 -1.     0.333]

  References:
    Bernstein et al., "signSGD with Majority Vote is Communication Efficient
    and Fault Tolerant", ICLR 2019 (arXiv 1810.05291); Liu et al.,
    "Communication Efficient Distributed Training with Distributed Lion",
    NeurIPS 2024 (arXiv 2404.00438).
  """
  def combine(q, n, chosen, alive, own):
    count = _count(q, axis_name, n, tie, chosen, alive).astype(jnp.float32)
    voters = live_workers(axis_name, n, alive, own)
    return jnp.where(voters > 0, count / jnp.maximum(voters, 1.0), 0.0)

  return _exchange(tree, axis_name, tie, transport, alive, _COUNT_TRANSPORTS,
                   combine)


def live_workers(axis_name, n, alive, own) -> jax.Array:
  """sum_i a_i as float32, from the mask, this worker's flag or N."""
  if alive is None:
    return jnp.float32(n)
  if alive.size == n and n > 1:
    return jnp.sum(alive.astype(jnp.float32))
  if axis_name is None:
    return own.astype(jnp.float32)
  return lax.psum(own.astype(jnp.float32), axis_name)


class SignAggregationState(NamedTuple):
  """State of :func:`majority_vote` and :func:`mean_of_signs`."""
  count: jax.Array  # type: ignore[assignment]  # int32: aggregation steps
  bytes_sent: jax.Array  # float32 scalar: count * bytes per step (ring model)


def _aggregator(aggregate, axis_name, transport, tie, allowed):
  _checks.check_tie(tie)
  _checks.check_choice("transport", transport, allowed)

  def init_fn(params):
    _checks.check_float_params(params)
    del params
    return SignAggregationState(count=jnp.zeros((), jnp.int32),
                                bytes_sent=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    _checks.warn_misspelled(extra_args)
    alive = extra_args.get("alive")
    out = aggregate(updates, axis_name, tie=tie, transport=transport,
                    alive=alive)
    n = axis_size(axis_name)
    per_step = sum(
        vote_bytes(choose_transport(transport, n, size, tie, allowed), n,
                   size, tie) for size in group_sizes(updates))
    count = optax.safe_increment(state.count)
    # A product, not a running float32 sum, so large totals do not drift.
    sent = count.astype(jnp.float32) * per_step
    return out, SignAggregationState(count=count, bytes_sent=sent)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def majority_vote(axis_name: Optional[AxisName], transport: str = "auto",
                  tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Replaces each worker's update by the majority vote of all workers' signs.

  .. math::
    u = \operatorname{tsign}_T\Big(\sum_i a_i\,
        \operatorname{tsign}_T(g_i)\Big),

  where :math:`g_i` is worker :math:`i`'s incoming update and :math:`a_i` the
  optional alive mask passed as the extra argument ``alive=`` (this worker's
  boolean, or a replicated length-N boolean vector). Chained with a learning
  rate it is majority-vote Sign-SGD; put it after a momentum for the signum
  variant. Use it inside ``jax.shard_map`` (see :func:`per_worker` for the
  gradient trap), ``jax.pmap`` or ``jax.vmap`` with ``axis_name``. The state
  field ``bytes_sent`` counts the bytes this worker has sent (ring model).

  Args:
    axis_name: the workers' axis name (or tuple); ``None``: one worker.
    transport: ``"auto"``, ``"psum"``, ``"allgather"`` or ``"alltoall"``; all
      give identical bits (see :func:`vote_bytes` for their bytes and
      :func:`select_transport` for what ``"auto"`` picks).
    tie: tie policy for local zeros and tied votes.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(majority_vote("data"),
    ...                  optax.scale_by_learning_rate(1e-3))

  References:
    Bernstein et al., "signSGD with Majority Vote is Communication Efficient
    and Fault Tolerant", ICLR 2019 (arXiv 1810.05291).
  """
  return _aggregator(vote_signs, axis_name, transport, tie, TRANSPORTS)


def mean_of_signs(axis_name: Optional[AxisName], transport: str = "auto",
                  tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Replaces each worker's update by the mean of all workers' signs.

  .. math::
    u = \frac{\sum_i a_i \operatorname{tsign}_T(g_i)}{\sum_i a_i},

  (0 when no worker is alive), with the alive mask from the extra argument
  ``alive=``. Each worker's influence is at most :math:`1/N` per coordinate.

  Args:
    axis_name: the workers' axis name (or tuple); ``None``: one worker.
    transport: ``"auto"``, ``"psum"`` or ``"allgather"``.
    tie: tie policy for local zeros.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(mean_of_signs("data"),
    ...                  optax.scale_by_learning_rate(1e-3))

  References:
    Bernstein et al., arXiv 1810.05291; Liu et al., "Communication Efficient
    Distributed Training with Distributed Lion", NeurIPS 2024.
  """
  return _aggregator(mean_signs, axis_name, transport, tie, _COUNT_TRANSPORTS)


def per_worker(params: Any, axis_name: AxisName) -> Any:
  """Marks replicated parameters as per-worker before differentiating.

  The fix for the ``shard_map`` gradient trap: inside ``shard_map`` with
  ``check_vma=True``, ``jax.grad`` with respect to device-invariant
  parameters (``in_specs=P()``) transposes the implicit invariant-to-varying
  cast into a float32 ``psum``, so the "local" gradient arrives already summed
  across workers at full precision. ``lax.pcast(params, axis_name,
  to="varying")`` before ``jax.grad`` keeps the gradients local, so only the
  compressed vote travels. Under ``pmap`` and named ``vmap`` (where values are
  already per worker), and for leaves that already vary along ``axis_name``,
  the parameters are returned unchanged.

  Args:
    params: a pytree of arrays.
    axis_name: the workers' axis name (or tuple).

  Returns:
    ``params``, device-varying along ``axis_name`` under ``shard_map``.

  Example:
    Per-worker gradients of replicated parameters on 4 devices; the compiled
    program contains no collective (without ``per_worker`` it has a float32
    all-reduce):

    >>> mesh = jax.make_mesh((4,), ("data",))
    >>> def local_grads(params, batch):
    ...   grads = jax.grad(loss_fn)(per_worker(params, "data"), batch)
    ...   return jax.tree.map(lambda g: g[None], grads)  # stack the workers
    >>> f = jax.jit(jax.shard_map(local_grads, mesh=mesh,
    ...                           in_specs=(P(), P("data")), out_specs=P("data")))
    >>> batch = jax.device_put(batch, jax.NamedSharding(mesh, P("data")))
    >>> jax.tree.map(jnp.shape, f(params, batch))
    {'b': (4, 2), 'w': (4, 3, 2)}
    >>> communication_bytes(f, params, batch).collectives
    ()
  """
  axis_size(axis_name)
  if not _is_manual(axis_name):  # named vmap: values are already per worker
    return params

  def cast(x):
    missing = tuple(a for a in axis_names(axis_name)
                    if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, params)
