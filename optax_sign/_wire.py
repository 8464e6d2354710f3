r"""Bytes on the wire, read from the collectives of a compiled XLA program.

:func:`communication_bytes` lowers and compiles a function, finds every
collective in the optimized HLO and prices it with the ring model (bytes *sent
per worker*; :math:`B` is the per-worker operand):

================== ==========================================
collective         bytes sent per worker
================== ==========================================
all-reduce         :math:`2(N-1)/N \cdot B`
all-gather         :math:`(N-1) \cdot B` (own contribution)
reduce-scatter     :math:`(N-1)/N \cdot B` (full input)
all-to-all         :math:`(N-1)/N \cdot B` (full input)
collective-permute :math:`B`
================== ==========================================

Asynchronous pairs (``-start``/``-done``, common on GPU) are counted once, at
the start. The figures come from what XLA will actually run, so they expose
silent full-precision reductions (for instance the ``shard_map`` gradient trap)
that a formula would miss.
"""

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")

_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_GROUPS_LISTS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(
    r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:,\s*device_ids=\(?\[([\d,]+)\](?:T\(([\d,]+)\))?\)?)?\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{([\d,{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program.

  Attributes:
    op: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``,
      ``"all-to-all"`` or ``"collective-permute"``.
    dtype: element type as XLA prints it (``"s8"``, ``"u8"``, ``"f32"``...).
    shape: result shape (the first array of a tuple result).
    group_size: workers per replica group (:math:`N`).
    elements: elements of the per-worker operand :math:`B` (all arrays).
    bytes_sent: bytes one worker sends, by the ring model.
    axes: the mesh axes a replica group spans (``()`` when no mesh is known
      or a group is a single device), in mesh order.
  """
  op: str
  dtype: str
  shape: Tuple[int, ...]
  group_size: int
  elements: int
  bytes_sent: float
  axes: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CommunicationReport:
  """All collectives of a program and their total bytes sent per worker."""
  collectives: Tuple[Collective, ...]
  total_bytes: float

  def bytes_by_axes(self) -> Dict[Tuple[str, ...], float]:
    """Bytes sent per worker, summed per tuple of mesh axes spanned."""
    out: Dict[Tuple[str, ...], float] = {}
    for c in self.collectives:
      out[c.axes] = out.get(c.axes, 0.0) + c.bytes_sent
    return out


def _itemsize(dtype: str) -> float:
  """Bytes per element of an HLO type: pred, s8, u8, bf16, f32, f8e4m3fn..."""
  if dtype == "pred":
    return 1.0
  match = re.match(r"[a-z]+(\d+)", dtype)
  if match is None:
    raise ValueError(f"unknown HLO element type {dtype!r}")
  return int(match.group(1)) / 8


def _arrays(shape_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
  return [(dtype, tuple(int(x) for x in dims.split(",") if x))
          for dtype, dims in _ARRAY.findall(shape_text)]


def _ints(text: str) -> List[int]:
  return [int(x) for x in text.split(",") if x]


def _iota(dims: List[int], perm: Optional[str]) -> np.ndarray:
  """XLA's iota tile ``[dims]T(perm)``: arange, reshaped, transposed."""
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  return ids.transpose(_ints(perm)) if perm else ids


def _mesh_groups(match: "re.Match[str]") -> np.ndarray:
  """Groups of ``mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'b'}``."""
  axes = re.findall(r"'([^']*)'=(\d+)", match.group(1))
  sizes = [int(size) for _, size in axes]
  if match.group(2):
    ids = _iota(_ints(match.group(2)), match.group(3)).reshape(sizes)
  else:
    ids = np.arange(int(np.prod(sizes))).reshape(sizes)
  names = [name for name, _ in axes]
  spanned = [names.index(a) for a in re.findall(r"'([^']*)'", match.group(4))]
  ids = np.moveaxis(ids, spanned, list(range(-len(spanned), 0)))
  return ids.reshape(-1, int(np.prod([sizes[i] for i in spanned])))


def device_groups(line: str, num_devices: int) -> List[List[int]]:
  """The replica groups of one HLO collective, as lists of logical device ids.

  Reads every format XLA prints: explicit lists ``{{0,1},{2,3}}``, iota tiles
  ``[2,4]<=[4,2]T(1,0)``, mesh groups ``mesh['a'=2,'b'=4] {'a'}`` (with or
  without ``device_ids``), ``source_target_pairs`` (each pair a group) and
  empty groups (all ``num_devices`` devices).
  """
  match = _GROUPS_MESH.search(line)
  if match:
    return _mesh_groups(match).tolist()
  match = _GROUPS_IOTA.search(line)
  if match:
    count, size = int(match.group(1)), int(match.group(2))
    ids = _iota(_ints(match.group(3)), match.group(4))
    return ids.reshape(count, size).tolist()
  match = _GROUPS_LISTS.search(line)
  if match:
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", match.group(1))]
    if groups:
      return groups
  match = _PAIRS.search(line)
  if match:
    return [_ints(p) for p in re.findall(r"\{([\d,]*)\}", match.group(1))]
  return [list(range(num_devices))]


def _axes_spanned(groups: List[List[int]], mesh: Any) -> Tuple[str, ...]:
  """Mesh axes along which the devices of some group differ.

  Logical id ``k`` of a program partitioned over ``mesh`` is the device
  ``mesh.devices.flat[k]`` (the device assignment of its ``NamedSharding``).
  """
  if mesh is None:
    return ()
  shape = mesh.devices.shape
  varies = np.zeros(len(shape), bool)
  for group in groups:
    if max(group) >= int(np.prod(shape)):
      return ()
    coords = np.array(np.unravel_index(group, shape))  # [axes, members]
    varies |= (coords != coords[:, :1]).any(axis=1)
  return tuple(str(a) for a, v in zip(mesh.axis_names, varies) if v)


def parse_collectives(hlo_text: str, num_devices: Optional[int] = None,
                      mesh: Optional[Any] = None) -> CommunicationReport:
  """Finds and prices the collectives in optimized HLO text.

  Args:
    hlo_text: the text of a compiled module (``compiled.as_text()``).
    num_devices: group size for collectives printed with empty replica groups
      (all devices); defaults to the mesh's size, else ``jax.device_count()``.
    mesh: the ``jax.sharding.Mesh`` the program is partitioned over; names
      the axes each collective spans (``Collective.axes``).

  Returns:
    A :class:`CommunicationReport`.
  """
  if num_devices is not None:
    default = num_devices
  elif mesh is not None:
    default = int(mesh.devices.size)
  else:
    default = jax.device_count()
  found = []
  for line in hlo_text.splitlines():
    line = _COMMENT.sub("", line)  # long tuples carry /*index=5*/ comments
    match = _INSTRUCTION.search(line)
    if not match:
      continue
    op, is_start = match.group("op"), bool(match.group("start"))
    arrays = _arrays(match.group("shape"))
    if is_start and op != "all-reduce":
      arrays = [a for a in arrays if a[1]]  # drop u32[] context scalars
      arrays = arrays[len(arrays) // 2:]  # (operands..., results...)
    groups = device_groups(line, default)
    n = len(groups[0])
    result = sum(int(np.prod(s)) * _itemsize(t) for t, s in arrays)
    elements = sum(int(np.prod(s)) for _, s in arrays)
    if op == "all-reduce":
      sent = 2.0 * (n - 1) / n * result
    elif op == "all-gather":  # result = N x own contribution
      sent = (n - 1) * result / n
      elements //= n
    elif op == "reduce-scatter":  # result = input / N
      sent = (n - 1) * result
      elements *= n
    elif op == "all-to-all":  # result size = input size
      sent = (n - 1) / n * result
    else:  # collective-permute
      sent = result
    dtype, shape = arrays[0] if arrays else ("", ())
    found.append(Collective(op, dtype, shape, n, elements, sent,
                            _axes_spanned(groups, mesh)))
  return CommunicationReport(tuple(found), sum(c.bytes_sent for c in found))


def communication_bytes(fn: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> CommunicationReport:
  """Compiles ``fn(*args, **kwargs)`` and prices the collectives XLA will run.

  Args:
    fn: a function (jitted or not) whose collectives run over named axes, for
      example a ``jax.shard_map``-ped train step.
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: example keyword arguments.

  Returns:
    A :class:`CommunicationReport`: every collective with its op, dtype,
    shape, group size and bytes sent per worker, and their total.

  Each collective is priced once per appearance in the program text: one
  inside a loop body counts once, not once per iteration, and the branches of
  a ``lax.cond`` are all counted although one runs. Price a step function, and
  a conditional step (such as a local-steps sync) per branch.

  Example:
    The packed-bit vote of 4 workers on 1024 coordinates:

    >>> mesh = jax.make_mesh((4,), ("data",))
    >>> vote = jax.shard_map(
    ...     lambda g: optax_sign.vote_signs(g, "data", tie="positive",
    ...                                     transport="allgather"),
    ...     mesh=mesh, in_specs=P("data"), out_specs=P())
    >>> g = jax.device_put(jnp.ones((4, 1024)), jax.NamedSharding(mesh, P("data")))
    >>> report = communication_bytes(vote, g)
    >>> [(c.op, c.dtype) for c in report.collectives]
    [('all-gather', 'u8')]
    >>> report.total_bytes / 1024  # bytes per parameter per worker: (N - 1) / 8
    0.375
  """
  compiled = jax.jit(fn).lower(*args, **kwargs).compile()
  text = compiled.as_text()
  if text is None:
    raise ValueError("communication_bytes: the compiled program has no HLO text")
  return parse_collectives(text, mesh=_program_mesh(compiled))


def _program_mesh(compiled: Any) -> Optional[Any]:
  """The mesh of the first ``NamedSharding`` among the program's inputs or
  outputs, else the mesh set with ``jax.set_mesh`` (``None`` if neither)."""
  for sharding in jax.tree.leaves((compiled.input_shardings,
                                   compiled.output_shardings)):
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  mesh = jax.sharding.get_mesh()
  return None if mesh.empty else mesh
