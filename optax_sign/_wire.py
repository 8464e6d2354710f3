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
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")

_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\})")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
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
  """
  op: str
  dtype: str
  shape: Tuple[int, ...]
  group_size: int
  elements: int
  bytes_sent: float


@dataclasses.dataclass(frozen=True)
class CommunicationReport:
  """All collectives of a program and their total bytes sent per worker."""
  collectives: Tuple[Collective, ...]
  total_bytes: float


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


def _group_size(line: str, default: int) -> int:
  match = _GROUPS_IOTA.search(line)
  if match:
    return int(match.group(2))
  match = _GROUPS_LIST.search(line)
  if match:
    members = [x for x in match.group(1).strip("{}").split(",") if x]
    if members:
      return len(members)
  match = _PAIRS.search(line)
  if match:
    return len(set(re.findall(r"\d+", match.group(1))))
  return default


def parse_collectives(hlo_text: str,
                      num_devices: Optional[int] = None) -> CommunicationReport:
  """Finds and prices the collectives in optimized HLO text.

  Args:
    hlo_text: the text of a compiled module (``compiled.as_text()``).
    num_devices: group size for collectives printed with empty replica groups
      (all devices); defaults to ``jax.device_count()``.

  Returns:
    A :class:`CommunicationReport`.
  """
  default = jax.device_count() if num_devices is None else num_devices
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
    n = _group_size(line, default)
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
    found.append(Collective(op, dtype, shape, n, elements, sent))
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
    >>> report = communication_bytes(train_step, params, batch)
    >>> report.total_bytes / num_params  # bytes per parameter per step
  """
  text = jax.jit(fn).lower(*args, **kwargs).compile().as_text()
  return parse_collectives(text)
