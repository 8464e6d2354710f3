"""Replica groups of HLO collectives, and the mesh axes they span."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import pytest

from optax_sign import _wire

_OP = "%ar = f32[1024]{0} all-reduce(%p), channel_id=1, "
_TAIL = ", use_global_device_ids=true, to_apply=%add"


@pytest.mark.parametrize("groups_text, expected", [
    # Explicit lists.
    ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("replica_groups={{0,4},{1,5},{2,6},{3,7}}",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # Iota: arange(8) -> [2,4].
    ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    # arange(8).reshape(2,4) = [[0,1,2,3],[4,5,6,7]], .T -> 4 groups of 2.
    ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # arange(8).reshape(2,2,2).transpose(2,1,0)[i,j,k] = 4k + 2j + i.
    ("replica_groups=[2,4]<=[2,2,2]T(2,1,0)", [[0, 4, 2, 6], [1, 5, 3, 7]]),
    # Mesh groups without device ids: ids[a0, a1] = 4*a0 + a1.
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
     [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # Two of three axes spanned: ids[x, y, z] = 4x + 2y + z, group per y.
    ("replica_groups=mesh['x'=2,'y'=2,'z'=2] {'x','z'}",
     [[0, 1, 4, 5], [2, 3, 6, 7]]),
    # Mesh groups with device ids: [2,4]T(1,0) = [0,4,1,5,2,6,3,7] laid out
    # as [4,1,2]; a group per axis_2 coordinate, running along axis_0.
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], "
     "device_ids=([2,4]T(1,0)) {'axis_0'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], "
     "device_ids=([2,4]T(1,0)) {'axis_2'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # Empty groups: every device.
    ("replica_groups={}", [list(range(8))]),
])
def test_device_groups_formats(groups_text, expected):
  assert _wire.device_groups(_OP + groups_text + _TAIL, 8) == expected


def test_device_groups_source_target_pairs_and_no_groups():
  line = ("%cp = f32[16]{0} collective-permute(%p), channel_id=2, "
          "source_target_pairs={{0,1},{1,2}}, metadata={}")
  assert _wire.device_groups(line, 8) == [[0, 1], [1, 2]]
  # No replica_groups attribute at all: all num_devices devices.
  line = "%ar = f32[16]{0} all-reduce(%p), to_apply=%add"
  assert _wire.device_groups(line, 4) == [[0, 1, 2, 3]]


def _mesh():
  return jax.make_mesh((2, 4), ("a", "b"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def test_jit_partitioned_reduction_spans_only_its_axis():
  # XLA prints mesh groups with device ids for this one; the reduction over
  # the rows sharded on "b" runs in groups of 4, not across all 8 devices.
  mesh = _mesh()
  x = jax.device_put(jnp.ones((8, 1024), jnp.float32),
                     NamedSharding(mesh, P("b", None)))
  report = _wire.communication_bytes(lambda x: jnp.sum(x, axis=0), x)
  [coll] = report.collectives
  assert (coll.op, coll.dtype, coll.shape) == ("all-reduce", "f32", (1024,))
  assert (coll.group_size, coll.axes) == (4, ("b",))
  assert coll.bytes_sent == 2 * (4 - 1) / 4 * 4096 == 6144
  assert report.total_bytes == 6144
  assert report.bytes_by_axes() == {("b",): 6144}


_BLOCK = 4 * 256 * 4  # bytes of one worker's f32[4, 256] block of f32[8, 1024]


@pytest.mark.parametrize("collective, axes, group_size, sent", [
    ("psum", "a", 2, 2 * 1 / 2 * _BLOCK),
    ("psum", "b", 4, 2 * 3 / 4 * _BLOCK),
    ("psum", ("a", "b"), 8, 2 * 7 / 8 * _BLOCK),
    ("all_gather", "b", 4, 3 * _BLOCK),
])
def test_shard_map_collective_axes(collective, axes, group_size, sent):
  mesh = _mesh()
  op = getattr(jax.lax, collective)
  f = jax.shard_map(lambda v: op(v, axes), mesh=mesh, in_specs=P("a", "b"),
                    out_specs=P(), check_vma=False)
  x = jax.device_put(jnp.ones((8, 1024), jnp.float32),
                     NamedSharding(mesh, P("a", "b")))
  report = _wire.communication_bytes(f, x)
  [coll] = report.collectives
  want_axes = axes if isinstance(axes, tuple) else (axes,)
  assert coll.op == collective.replace("psum", "all-reduce").replace("_", "-")
  assert (coll.group_size, coll.axes, coll.elements) == (
      group_size, want_axes, 4 * 256)
  assert coll.bytes_sent == sent
  assert report.bytes_by_axes() == {want_axes: sent}


def test_bytes_by_axes_sums_per_axes_tuple():
  mesh = _mesh()

  def body(v):
    return (jax.lax.psum(v, "a"), jax.lax.psum(2 * v, "b"),
            jax.lax.psum(3 * v, ("a", "b")), jax.lax.all_gather(v, "b"))

  f = jax.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P(),
                    check_vma=False)
  x = jax.device_put(jnp.ones((8, 1024), jnp.float32),
                     NamedSharding(mesh, P("a", "b")))
  report = _wire.communication_bytes(f, x)
  assert sorted((c.op, c.axes) for c in report.collectives) == [
      ("all-gather", ("b",)), ("all-reduce", ("a",)),
      ("all-reduce", ("a", "b")), ("all-reduce", ("b",))]
  assert report.bytes_by_axes() == {
      ("a",): _BLOCK,  # 2 (2-1)/2 B
      ("b",): 2 * 3 / 4 * _BLOCK + 3 * _BLOCK,  # psum 6144 + gather 12288
      ("a", "b"): 2 * 7 / 8 * _BLOCK,
  }
  assert report.total_bytes == sum(report.bytes_by_axes().values()) == 29696


def test_program_without_named_sharding_or_collectives_is_empty():
  report = _wire.communication_bytes(lambda v: v * 2 + 1, jnp.ones(16))
  assert report.collectives == ()
  assert report.total_bytes == 0
  assert report.bytes_by_axes() == {}
