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
import time

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


def launch(script, tmp_path, timeout=240, devices_per_process=None,
           env=None, check=True, grace=10.0):
  """Runs ``script`` as every process; returns each process's saved arrays.

  ``env`` adds environment variables. With ``check=False`` a failing process
  is expected (a simulated crash): once one exits with an error, the others
  get ``grace`` seconds to notice, then are killed (a supervisor restarting a
  job does the same); returns ``(return codes, logs, seconds from the first
  failure until every process had ended)``.
  """
  devices = str(devices_per_process or DEVICES_PER_PROCESS)
  port = str(_free_port())
  env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join(
      [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  outputs = [str(tmp_path / f"process{i}.npz") for i in range(PROCESSES)]
  logs = [tmp_path / f"process{i}.log" for i in range(PROCESSES)]
  files = [open(path, "wb") for path in logs]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen([sys.executable, script, str(i), port, outputs[i],
                             devices],
                            env=env, stdout=f, stderr=subprocess.STDOUT)
           for i, f in enumerate(files)]
  start, failed_at = time.monotonic(), None
  try:
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now
      if now - start > timeout or (failed_at is not None
                                   and now - failed_at > grace):
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for f in files:
      f.close()
  text = [path.read_text(errors="replace") for path in logs]
  if not check:
    ended = time.monotonic() - (failed_at or time.monotonic())
    return [p.returncode for p in procs], text, ended
  for p, log in zip(procs, text):
    assert p.returncode == 0, log[-3000:]
  return [dict(np.load(path)) for path in outputs]


def worker_main(run, make_mesh=None, heartbeat_timeout=100):
  """The script side: join the runtime, run on the global mesh, save.

  ``make_mesh()`` builds the global mesh (default: one Auto axis ``"x"`` over
  every device); the devices per process come from :func:`launch`.
  ``heartbeat_timeout`` (seconds) is how long the runtime waits for a silent
  peer before it fails the others.
  """
  process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  devices = int(sys.argv[4])
  jax.config.update("jax_num_cpu_devices", devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES,
                             process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  assert jax.device_count() == PROCESSES * devices, jax.devices()
  if make_mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("x",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  else:
    mesh = make_mesh()
  np.savez(out_path, **run(mesh))
  jax.distributed.shutdown()
