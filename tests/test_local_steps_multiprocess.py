"""Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives) vs one.

The test starts this file twice as a script, one process per worker pair
(2 CPU devices each, 4 workers in all), runs DSM-LS under ``shard_map`` on the
global mesh and compares the anchor with the same run on 4 local devices.
"""

import jax
import numpy as np

import distributed_launch

STEPS = 9


def run_dsm_ls(mesh):
  """DSM-LS on the 4-worker ``mesh``; returns the anchor as NumPy arrays."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import test_local_steps as t  # pylint: disable=g-import-not-at-top

  opt = t._dsm(3, 0.05)  # pylint: disable=protected-access
  fn = t._shard_map_fn(opt, STEPS, mesh)  # pylint: disable=protected-access
  args = t._shard_map_args(opt)  # pylint: disable=protected-access
  specs = (P("x"), t._shard_map_specs(), P("x"))  # pylint: disable=protected-access
  args = jax.tree.map(
      lambda spec, tree: jax.tree.map(
          lambda x: distributed_launch.global_array(x, mesh, spec), tree),
      specs, args, is_leaf=lambda x: isinstance(x, P))
  _, state = fn(*args)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                      state.anchor)


def test_two_processes_equal_one_process(tmp_path):
  import test_local_steps as t  # pylint: disable=g-import-not-at-top
  expected = run_dsm_ls(t._mesh(4))  # pylint: disable=protected-access
  for got in distributed_launch.launch(__file__, tmp_path):
    for name, value in expected.items():
      np.testing.assert_array_equal(got[name], value)


if __name__ == "__main__":
  distributed_launch.worker_main(run_dsm_ls)
