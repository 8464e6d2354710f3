"""Shared launcher for the real multi-process tests (jax.distributed, gloo).

A test module that is also a script calls :func:`launch` from the test and
:func:`worker_main` under ``if __name__ == "__main__"``: two processes with 2
CPU devices each (or ``devices_per_process``) join one runtime on 127.0.0.1
and save what ``run(mesh)`` returns on the global mesh, for comparison with a
1-process run.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 2
DEVICES_PER_PROCESS = 2


def global_array(value, mesh, spec):
  """``value`` (the same NumPy array on every process) placed on ``mesh``."""
  value = np.asarray(value)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(script, tmp_path, timeout=240, devices_per_process=None):
  """Runs ``script`` as every process; returns each process's saved arrays."""
  devices = str(devices_per_process or DEVICES_PER_PROCESS)
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  outputs = [str(tmp_path / f"process{i}.npz") for i in range(PROCESSES)]
  procs = [subprocess.Popen([sys.executable, script, str(i), port, outputs[i],
                             devices],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
           for i in range(PROCESSES)]
  try:
    logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [dict(np.load(path)) for path in outputs]


def worker_main(run, make_mesh=None):
  """The script side: join the runtime, run on the global mesh, save.

  ``make_mesh()`` builds the global mesh (default: one Auto axis ``"x"`` over
  every device); the devices per process come from :func:`launch`.
  """
  process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  devices = int(sys.argv[4])
  jax.config.update("jax_num_cpu_devices", devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES,
                             process_id=process_id)
  assert jax.device_count() == PROCESSES * devices, jax.devices()
  if make_mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("x",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  else:
    mesh = make_mesh()
  np.savez(out_path, **run(mesh))
  jax.distributed.shutdown()
