"""Bytes on the wire, from the compiled HLO of the vote's transports."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

import optax_sign
from optax_sign import _communication
from optax_sign import _wire


def _mesh(n):
  return jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def test_fp32_pmean_baseline():
  d = 4096
  f = jax.shard_map(lambda g: jax.lax.pmean(g[0], "x"), mesh=_mesh(8),
                    in_specs=P("x"), out_specs=P())
  report = optax_sign.communication_bytes(
      f, jax.ShapeDtypeStruct((8, d), jnp.float32))
  [coll] = report.collectives
  assert (coll.op, coll.dtype, coll.group_size, coll.elements) == (
      "all-reduce", "f32", 8, d)
  assert report.total_bytes / d == pytest.approx(8 * 7 / 8)


def _shard_map_vote(n, d, tie, transport):
  f = jax.shard_map(
      lambda g: optax_sign.vote_signs(g[0], "x", tie=tie, transport=transport),
      mesh=_mesh(n), in_specs=P("x"), out_specs=P())
  return f, jax.ShapeDtypeStruct((n, d), jnp.float32)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_bytes_per_parameter_match_formulas(n, tie):
  d = 8192
  c = 2 if tie == "zero" else 1
  formulas = {"psum": 2 * (n - 1) / n,
              "allgather": c * (n - 1) / 8,
              "alltoall": 2 * c * (n - 1) / (8 * n)}
  for transport, expected in formulas.items():
    report = optax_sign.communication_bytes(*_shard_map_vote(n, d, tie,
                                                             transport))
    assert report.total_bytes / d == pytest.approx(expected)
    assert report.total_bytes == optax_sign.vote_bytes(transport, n, d, tie)
    for coll in report.collectives:  # integers only; nothing gradient-sized
      assert coll.dtype in ("s8", "u8"), coll
  auto = optax_sign.communication_bytes(*_shard_map_vote(n, d, tie, "auto"))
  chosen = _communication.choose_transport("auto", n, d, tie)
  assert auto.total_bytes == optax_sign.vote_bytes(chosen, n, d, tie)


def test_two_valued_alltoall_is_at_most_a_quarter_byte_at_8_workers():
  d = 100_000  # not a multiple of 8N: padding included
  report = optax_sign.communication_bytes(
      *_shard_map_vote(8, d, "positive", "alltoall"))
  assert [c.op for c in report.collectives] == ["all-to-all", "all-gather"]
  assert report.total_bytes / d <= 0.25


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_interconnects_sends_fewest_bytes(backend):
  # N = 2: allgather and alltoall cost the same; the single collective wins.
  select = optax_sign.select_transport
  assert select(backend, 2, 1024, "positive") == "allgather"
  assert select(backend, 8, 1024, "zero") == "alltoall"
  assert select(backend, 8, 10**7, "positive") == "alltoall"
  assert select(backend, 64, 1024, "zero", ("auto", "psum", "allgather")) == (
      "psum")
  assert select(backend, 1, 1024, "zero") == "psum"  # nothing to send


def test_auto_on_cpu_goes_psum_allgather_alltoall_as_vectors_grow():
  select = optax_sign.select_transport
  gather_from = _communication._CPU_ALLGATHER_FROM
  alltoall_from = _communication._CPU_ALLTOALL_FROM
  assert (gather_from, alltoall_from) == (2**18, 2**21)
  means = ("auto", "psum", "allgather")  # the mean of signs: no alltoall
  for n in (2, 4, 8, 64):
    for tie in ("zero", "positive"):
      assert select("cpu", n, gather_from - 1, tie) == "psum"
      assert select("cpu", n, gather_from, tie) == "allgather"
      assert select("cpu", n, alltoall_from - 1, tie) == "allgather"
      assert select("cpu", n, alltoall_from, tie) == "alltoall"
      assert select("cpu", n, alltoall_from, tie, means) == "allgather"
      assert select("cpu", n, gather_from - 1, tie, means) == "psum"
  assert select("cpu", 1, 10**7, "zero") == "psum"
  assert _communication.choose_transport("auto", 8, gather_from, "zero") == (
      select(jax.default_backend(), 8, gather_from, "zero"))


def test_auto_across_processes_prices_bytes(monkeypatch):
  """CPU devices of several processes talk over a network: fewest bytes."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert _communication.choose_transport("auto", 8, 1024, "zero") == (
      "alltoall")
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  assert _communication.choose_transport("auto", 8, 1024, "zero") == (
      optax_sign.select_transport(jax.default_backend(), 8, 1024, "zero"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend=None), "backend"), (dict(num_workers=0), "num_workers"),
    (dict(size=-1), "size"), (dict(tie="up"), "tie"),
    (dict(allowed=("auto",)), "allowed"), (dict(allowed=("ring",)), "allowed"),
])
def test_select_transport_rejects_bad_input(kwargs, message):
  args = dict(dict(backend="gpu", num_workers=8, size=1024, tie="zero"),
              **kwargs)
  with pytest.raises((TypeError, ValueError), match=message):
    optax_sign.select_transport(**args)


def test_wire_parser_on_async_and_iota_groups():
  text = "\n".join([
      "  %ars = f32[1000]{0} all-reduce-start(f32[1000]{0} %p), "
      "replica_groups=[1,4]<=[4], to_apply=%add",
      "  %ard = f32[1000]{0} all-reduce-done(f32[1000]{0} %ars)",
      "  %ags = (u8[16]{0}, u8[64]{0}) all-gather-start(u8[16]{0} %q), "
      "replica_groups={{0,1,2,3}}, dimensions={0}",
      "  %agd = u8[64]{0} all-gather-done((u8[16]{0}, u8[64]{0}) %ags)",
      "  %cp = f32[10]{0} collective-permute(f32[10]{0} %r), "
      "source_target_pairs={{0,1},{1,0}}",
  ])
  report = _wire.parse_collectives(text)
  assert [c.op for c in report.collectives] == [
      "all-reduce", "all-gather", "collective-permute"]
  assert report.collectives[0].bytes_sent == pytest.approx(1.5 * 4000)
  assert report.collectives[1].bytes_sent == 3 * 16
  assert report.collectives[1].elements == 16
  assert report.total_bytes == pytest.approx(6000 + 48 + 40)


def test_wire_benchmark_table_agrees_with_formulas():
  from optax_sign.bench import wire  # pylint: disable=g-import-not-at-top
  rows = wire.measure([2, 8], 4096)
  assert len(rows) == 2 * (1 + 2 * 4)
  for row in rows:
    assert row["hlo"] == pytest.approx(row["formula"]), row
  table = wire.format_table(rows)
  assert "auto (alltoall)" in table and "fp32 pmean" in table


def test_wire_parser_prices_narrow_float_types():
  text = ("  %ag = f8e4m3fn[64]{0} all-gather(f8e4m3fn[16]{0} %q), "
          "replica_groups={{0,1,2,3}}, dimensions={0}")
  [coll] = _wire.parse_collectives(text).collectives
  assert (coll.dtype, coll.bytes_sent) == ("f8e4m3fn", 3 * 16)
