"""Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives) vs one.

The test starts this file twice as a script, one process per worker pair
(2 CPU devices each, 4 workers in all), runs DSM-LS under ``shard_map`` on the
global mesh and compares the anchor with the same run on 4 local devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 9


def _global_array(value, mesh, spec):
  sharding = jax.sharding.NamedSharding(mesh, spec)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


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
          lambda x: _global_array(x, mesh, spec), tree),
      specs, args, is_leaf=lambda x: isinstance(x, P))
  _, state = fn(*args)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                      state.anchor)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  import test_local_steps as t  # pylint: disable=g-import-not-at-top
  expected = run_dsm_ls(t._mesh(4))  # pylint: disable=protected-access
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(pid), str(port),
       str(tmp_path / f"anchor{pid}.npz")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for pid in range(2)]
  try:
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  for pid in range(2):
    got = np.load(tmp_path / f"anchor{pid}.npz")
    for name, value in expected.items():
      np.testing.assert_array_equal(got[name], value)


if __name__ == "__main__":
  process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  assert jax.device_count() == 4, jax.devices()
  global_mesh = jax.make_mesh((4,), ("x",),
                              axis_types=(jax.sharding.AxisType.Auto,))
  np.savez(out_path, **run_dsm_ls(global_mesh))
  jax.distributed.shutdown()
