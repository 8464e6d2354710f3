"""The sharded-layouts benchmark (bytes per mesh axis and step time), small."""

import pytest

from optax_sign.bench import sharded


def test_every_layout_and_method_is_measured_and_the_votes_send_less():
  rows = sharded.measure(width=16, repeats=1)
  by = {(r["layout"], r["method"]): r for r in rows}
  for layout, (*_, fsdp) in sharded.LAYOUTS.items():
    for method in ["fp32 all-reduce", *sharded._methods(fsdp)]:
      assert (layout, method) in by, (layout, method)
  table = sharded.format_table(rows)
  assert all(f"| {r['layout']} | {r['method']} |" in table for r in rows)
  for (layout, method), r in by.items():
    plain = by[(layout, "fp32 all-reduce")]
    if method == "error feedback":  # on Auto axes: its 5 leaves' scales
      assert r["gather"] * r["params"] <= 4 * 5 * 8
    else:  # FSDP's own gather of the parameters, or none
      assert r["gather"] == pytest.approx(plain["gather"])
    if method != "fp32 all-reduce":  # the exchange: int8 or less per float32
      assert r["data"] - r["gather"] <= (plain["data"] - plain["gather"]) / 4 + 1e-9
  fsdp = by[("FSDP data=8", "sharded vote (tie=positive)")]
  assert fsdp["gather"] > 3  # 7/8 of 4 B for (almost) every parameter
  assert by[("DP data=8", "fp32 all-reduce")]["gather"] == 0
