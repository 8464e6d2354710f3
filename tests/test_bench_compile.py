"""The benchmark CLI's persistent compilation cache and its compile/train split.

Structure only, no timings: the cache folder fills, ``--no-compile-cache``
writes nothing, a second process loads every program from the cache, and
``results.json`` keeps compile and training seconds apart.
"""

import json
import os
import subprocess
import sys

import jax

from optax_sign.bench import cli
from optax_sign.bench import runner

# A tiny run: one task, one optimizer, no grid.
TINY = ["--tiny", "--no-progress", "--task", "logreg", "-o", "adamw",
        "--grid", "--steps", "5"]
CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                  "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


def _env(tmp_path):
  """The environment of a fresh process whose default cache is in tmp_path."""
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"),
             JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _run_process(tmp_path, out, *args):
  """Runs ``python -m optax_sign.bench`` in a fresh process; its results."""
  result = subprocess.run(
      [sys.executable, "-m", "optax_sign.bench", *TINY, "--out", str(out),
       *args], env=_env(tmp_path), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  with open(out / "results.json", encoding="utf-8") as f:
    return result.stdout, json.load(f)


def test_second_process_loads_every_program_from_the_cache(tmp_path):
  cache = tmp_path / "xdg" / "optax_sign" / "jax"  # the default folder
  stdout, first = _run_process(tmp_path, tmp_path / "a")
  assert len(os.listdir(cache)) > 0
  timing = first["timing"]
  assert timing["compile_cache"] == str(cache)
  assert timing["compiled"] > 0
  assert timing["programs"] == timing["compiled"] + timing["cache_hits"]
  for key in ("compile_seconds", "train_seconds", "other_seconds"):
    assert timing[key] >= 0.0
  assert timing["total_seconds"] >= timing["compile_seconds"] + timing[
      "train_seconds"]
  assert f"compile cache: {cache}" in stdout
  assert "training steps" in stdout and "programs:" in stdout

  _, second = _run_process(tmp_path, tmp_path / "b")
  timing = second["timing"]
  assert timing["compiled"] == 0
  assert timing["cache_hits"] == timing["programs"] > 0


def test_no_compile_cache_writes_nothing(tmp_path, capsys, monkeypatch):
  """In-process: nothing reaches the default folder, and JAX's settings are
  the same after ``main`` as before (also with a cache folder)."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  before = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
  assert cli.main([*TINY, "--out", str(tmp_path / "a"),
                   "--no-compile-cache"]) == 0
  assert not (tmp_path / "xdg" / "optax_sign").exists()
  assert "compile cache: off" in capsys.readouterr().out
  with open(tmp_path / "a" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["timing"]["compile_cache"] is None
  assert {name: getattr(jax.config, name) for name in CACHE_SETTINGS} == before

  cache = tmp_path / "cache"
  assert cli.main([*TINY, "--out", str(tmp_path / "b"),
                   "--compile-cache", str(cache)]) == 0
  assert len(os.listdir(cache)) > 0
  assert {name: getattr(jax.config, name) for name in CACHE_SETTINGS} == before


def test_default_compile_cache_follows_the_environment(monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", "/x")
  assert cli.default_compile_cache() == os.path.join("/x", "optax_sign", "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert cli.default_compile_cache() == os.path.join(
      os.path.expanduser("~"), ".cache", "optax_sign", "jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/j")
  assert cli.default_compile_cache() == "/j"
  help_text = " ".join(cli.parser().format_help().split())
  assert "--compile-cache DIR" in help_text and "--no-compile-cache" in help_text


def test_grid_runs_compile_nothing_after_the_first():
  """One compiled step serves the whole learning-rate grid: the runs after
  the first compile no program at all (the first compiles the evaluation)."""
  from optax_sign.bench import optimizers as opt_lib  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.make_task("logreg", tiny=True)
  entry = opt_lib.lookup("sign_sgd")
  stepper = runner.single_worker_stepper(task, entry, opt_lib.Context(), 1e-3)
  runner.train(stepper, runner.Run(entry.name, 1e-3), 4, 0, 2, progress=False,
               set_lr=1e-3)
  with runner.CompileClock() as clock:
    for lr in (1e-2, 1e-1):
      runner.train(stepper, runner.Run(entry.name, lr), 4, 0, 2,
                   progress=False, set_lr=lr)
  assert clock.programs == 0
  with runner.CompileClock() as clock:
    jax.jit(lambda x: x * 3.0)(1.0)
  assert clock.programs == 1 and clock.seconds > 0
