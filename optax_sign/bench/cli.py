"""Command line: compare optimizers side by side on real data.

Examples::

  python -m optax_sign.bench                      # ALIAS vs tuned Sign-SGD vs AdamW
  python -m optax_sign.bench --task logreg --data rcv1.libsvm --steps 1000
  python -m optax_sign.bench --task mlp --data /usr/share/datasets/fashion-mnist
  python -m optax_sign.bench --task charlm --optimizers alias adamw prodigy
  python -m optax_sign.bench --workers 8 --task mlp   # majority vote, DSM-LS...
  python -m optax_sign.bench --list

Every run prints a table, writes ``results.json`` and one PNG per task into
``--out``, and shows a progress bar. It ends with the time spent compiling
and the time spent in training steps.

Compiled programs go to JAX's persistent compilation cache
(:func:`default_compile_cache`, or ``--compile-cache DIR``), so a second run
of the same tasks and optimizers loads them instead of compiling them again;
``--no-compile-cache`` compiles everything afresh.
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from typing import Any, Iterator, NoReturn, Optional, Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache

from optax_sign.bench import data as data_lib
from optax_sign.bench import optimizers as opt_lib

# The ``bench`` extra (pyproject.toml): import name -> package name. ``tasks``
# (flax), ``runner`` (tqdm), ``report`` (matplotlib) and ``data``
# (scikit-learn) import them, the last three lazily; this module imports
# ``tasks`` only inside functions, so that ``main`` can name what is missing.
EXTRA_MODULES = {"flax": "flax", "matplotlib": "matplotlib",
                 "sklearn": "scikit-learn", "tqdm": "tqdm"}
INSTALL_HINT = 'pip install "optax-sign[bench]"'


def _lr_override(text: str):
  name, sep, value = text.partition("=")
  try:
    if not sep:
      raise ValueError
    return name, float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected NAME=LR (e.g. adamw=3e-3), got {text!r}") from None


def parser() -> argparse.ArgumentParser:
  from optax_sign.bench import tasks as task_lib  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog="optax-sign-bench",
      description="Compare optax_sign optimizers with optax baselines on real "
                  "data (logistic regression, an MLP, a character Transformer).",
      epilog="Default: ALIAS vs grid-tuned Sign-SGD vs AdamW on logreg and mlp.")
  p.add_argument("--task", nargs="+", choices=task_lib.TASKS,
                 default=["logreg", "mlp"], help="tasks to run (default: "
                 "logreg mlp)")
  p.add_argument("--optimizers", "-o", nargs="*", default=None,
                 help="optimizers run at their default (or --lr) learning "
                 "rate; see --list (default: "
                 + " ".join(opt_lib.DEFAULT_SINGLE) + "; with --workers > 1: "
                 + " ".join(opt_lib.DEFAULT_MULTI) + ")")
  p.add_argument("--grid", nargs="*", default=None,
                 help="baselines whose learning rate is tuned over a log grid "
                 "(default: sign_sgd with one worker, none with several; "
                 "pass --grid with no names to disable)")
  p.add_argument("--grid-range", nargs=2, type=float, default=(1e-4, 1.0),
                 metavar=("LOW", "HIGH"), help="grid bounds (default 1e-4 1)")
  p.add_argument("--grid-points", type=int, default=5,
                 help="grid size (default 5, one per decade)")
  p.add_argument("--lr", type=_lr_override, action="append", default=[],
                 metavar="NAME=LR", help="learning rate of one optimizer")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per run (default: per task, 300)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="mini-batch size per worker; 0 = full batch (default: "
                 "logreg full batch, mlp 128, charlm 32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=1,
                 help="simulated CPU devices (shard_map); > 1 runs the "
                 "multi-worker methods and counts bytes on the wire")
  p.add_argument("--data", default=None,
                 help="data path for the (single) task: a LIBSVM file "
                 "(logreg), a directory or images file in MNIST idx format "
                 "(mlp; e.g. /usr/share/datasets/fashion-mnist from Debian's "
                 "dataset-fashion-mnist), a UTF-8 text file (charlm)")
  p.add_argument("--out", default="bench_results",
                 help="output folder for results.json and the plots")
  p.add_argument("--log-every", type=int, default=None,
                 help="evaluate the objective every K steps (default: 50 "
                 "points per run)")
  p.add_argument("--tiny", action="store_true",
                 help="tiny data, models and steps (for tests and smoke runs)")
  p.add_argument("--no-progress", action="store_true",
                 help="hide the progress bars")
  cache = p.add_mutually_exclusive_group()
  cache.add_argument("--compile-cache", metavar="DIR",
                     default=default_compile_cache(),
                     help="folder of JAX's persistent compilation cache: a "
                     "later run of the same tasks and optimizers loads its "
                     "programs from there instead of compiling them "
                     "(default: $JAX_COMPILATION_CACHE_DIR if set, else "
                     "$XDG_CACHE_HOME/optax_sign/jax or "
                     "~/.cache/optax_sign/jax; here %(default)s)")
  cache.add_argument("--no-compile-cache", action="store_true",
                     help="compile every program afresh, without the "
                     "persistent compilation cache")
  p.add_argument("--list", action="store_true",
                 help="list the optimizers and exit")
  return p


def default_compile_cache() -> str:
  """The default folder of the persistent compilation cache.

  JAX's own ``$JAX_COMPILATION_CACHE_DIR`` when it is set, else
  ``$XDG_CACHE_HOME/optax_sign/jax``, else ``~/.cache/optax_sign/jax``.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = (os.environ.get("XDG_CACHE_HOME")
          or os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(base, "optax_sign", "jax")


def _apply_settings(settings: dict) -> None:
  # JAX opens its cache at the first compilation that uses it: reset it so
  # that the next compilation follows the new settings.
  compilation_cache.reset_cache()
  for name, value in settings.items():
    jax.config.update(name, value)


@contextlib.contextmanager
def compile_cache(path: Optional[str]) -> Iterator[None]:
  """Uses JAX's persistent compilation cache in ``path`` within the block.

  ``path=None`` turns the persistent cache off instead. Every program is
  cached, however small and quick to compile (JAX's defaults skip programs
  compiled in under a second, which are all of this benchmark's on CPU). The
  previous settings come back on exit: a program calling :func:`main` keeps
  its own, and importing the package changes none.
  """
  settings: dict[str, Any]
  if path is None:
    settings = {"jax_enable_compilation_cache": False}
  else:
    settings = {"jax_enable_compilation_cache": True,
                "jax_compilation_cache_dir": path,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
  saved = {name: getattr(jax.config, name) for name in settings}
  _apply_settings(settings)
  try:
    yield
  finally:
    _apply_settings(saved)


def _cache_dir(args) -> Optional[str]:
  """The cache folder to use (None: none), created if need be.

  A folder that cannot be created only costs the cache: the run goes on
  without it, with a warning.
  """
  if args.no_compile_cache:
    return None
  try:
    os.makedirs(args.compile_cache, exist_ok=True)
  except OSError as e:
    print(f"optax-sign-bench: warning: no compilation cache ({e})",
          file=sys.stderr)
    return None
  return args.compile_cache


def list_optimizers() -> str:
  lines = []
  for multi in (False, True):
    lines.append("multi-worker (--workers N >= 2):" if multi
                 else "one worker:")
    for e in opt_lib.REGISTRY.values():
      if e.multi_worker != multi:
        continue
      lr = f"lr {e.default_lr:g}" if e.tunable else "parameter-free"
      lines.append(f"  {e.name:14s} {lr:15s} {e.description}")
  return "\n".join(lines)


def _fail(message: str) -> NoReturn:
  raise SystemExit(f"optax-sign-bench: error: {message}")


def missing_extras() -> list[str]:
  """The packages of :data:`EXTRA_MODULES` that cannot be imported."""
  return [package for module, package in EXTRA_MODULES.items()
          if importlib.util.find_spec(module) is None]


def require_extras() -> None:
  """Exits with an install hint when a package of the ``bench`` extra is
  missing (checked before any work: plots are drawn after the training)."""
  missing = missing_extras()
  if missing:
    _fail(f"missing packages of the bench extra: {', '.join(missing)}; "
          f"install them with: {INSTALL_HINT}")


def _select(args, multi: bool):
  """(entries to run at one lr, entries to grid-tune, lr by name)."""
  names = args.optimizers
  if names is None:
    names = opt_lib.DEFAULT_MULTI if multi else opt_lib.DEFAULT_SINGLE
  grid = args.grid
  if grid is None:
    grid = () if multi else opt_lib.DEFAULT_GRID
  try:
    plain = [opt_lib.lookup(name) for name in names]
    tuned = [opt_lib.lookup(name) for name in grid]
    selected = {opt_lib.lookup(name).name for name in names}
    lrs = {opt_lib.lookup(name).name: lr for name, lr in args.lr}
  except ValueError as e:
    _fail(str(e))
  for name, _ in args.lr:
    entry = opt_lib.lookup(name)
    if not entry.tunable:
      _fail(f"--lr {name}: it is parameter-free (no learning rate)")
    if entry.name not in selected:
      _fail(f"--lr {name}: {entry.name!r} is not among the optimizers run "
            "at one learning rate (select it with --optimizers; --grid "
            "tunes its own)")
  for entry in plain + tuned:
    if entry.multi_worker != multi:
      _fail(f"optimizer {entry.name!r} is "
            + ("multi-worker: pass --workers N with N >= 2"
               if entry.multi_worker
               else "single-worker: with --workers > 1 use the multi-worker "
               "methods (see --list)"))
  for entry in tuned:
    if not entry.tunable:
      _fail(f"--grid {entry.name}: it is parameter-free (no learning rate)")
  return plain, tuned, lrs


def run_task(args, name: str, plain, tuned, mesh, lrs: dict, out: str):
  """Runs every optimizer on one task; returns (rows, grids, task)."""
  from optax_sign.bench import distributed  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import report  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import runner  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import tasks as task_lib  # pylint: disable=g-import-not-at-top

  try:
    task = task_lib.make_task(name, args.data, args.batch_size, args.tiny,
                              args.seed)
  except data_lib.DataError as e:
    _fail(str(e))
  steps = args.steps or task_lib.DEFAULT_STEPS[name][1 if args.tiny else 0]
  log_every = args.log_every or max(1, steps // 50)
  context = opt_lib.Context(axis_name=opt_lib.AXIS if mesh else None,
                            steps=steps, f_lower=task.f_lower)
  workers = f", {args.workers} workers" if mesh else ""
  print(f"\n== {name}: {task.description}; {task.num_params} parameters; "
        f"{steps} steps{workers}", flush=True)

  def stepper(entry, lr):
    if mesh is not None:
      return distributed.multi_worker_stepper(task, entry, context, lr, mesh)
    return runner.single_worker_stepper(task, entry, context, lr)

  def train(st, entry, lr, set_lr=None):
    run = runner.Run(entry.name, lr)
    desc = f"{name}/{entry.name}" + (f" lr={lr:.3g}" if lr else "")
    return runner.train(st, run, steps, args.seed, log_every,
                        progress=not args.no_progress, desc=desc,
                        set_lr=set_lr)

  rows, grids = [], []
  for entry in plain:
    lr = lrs.get(entry.name, entry.default_lr) if entry.tunable else None
    rows.append(report.Row(entry.name, train(stepper(entry, lr), entry, lr)))
  lows, highs = args.grid_range
  grid_lrs = opt_lib.log_grid(lows, highs, args.grid_points)
  for entry in tuned:
    st = stepper(entry, grid_lrs[0])  # compiled once for the whole grid
    grid = report.Grid(entry.name, [train(st, entry, lr, set_lr=lr)
                                    for lr in grid_lrs])
    grids.append(grid)
    rows.append(grid.row())

  print(report.table(rows, task.num_params, multi_worker=mesh is not None))
  if grids:
    print(report.grid_summary(grids))
  png = os.path.join(out, f"{name}.png")
  title = f"{name}: {task.description}{workers}"
  report.plot(png, title, rows, grids, multi_worker=mesh is not None)
  print(f"plot: {png}", flush=True)
  return rows, grids, task


def _check(args) -> None:
  """Exits with a clear message on a bad value (before any work)."""
  if args.workers < 1:
    _fail("--workers must be >= 1")
  if args.steps is not None and args.steps < 1:
    _fail("--steps must be >= 1")
  if args.batch_size is not None and args.batch_size < 0:
    _fail("--batch-size must be >= 0 (0 = full batch)")
  if args.log_every is not None and args.log_every < 1:
    _fail("--log-every must be >= 1")
  if args.grid_points < 1:
    _fail("--grid-points must be >= 1")
  low, high = args.grid_range
  if not 0 < low <= high:
    _fail(f"--grid-range needs 0 < LOW <= HIGH, got {low:g} {high:g}")
  if args.data is not None and len(args.task) != 1:
    _fail("--data applies to one task: pass exactly one --task")
  if args.data is not None and not os.path.exists(args.data):
    _fail(f"data path {args.data!r} does not exist")


def _run_tasks(args, plain, tuned, lrs: dict):
  """Runs every task; returns (results by task, seconds of training steps)."""
  from optax_sign.bench import distributed  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import report  # pylint: disable=g-import-not-at-top
  mesh = None
  if args.workers > 1:
    try:
      mesh = distributed.make_mesh(args.workers)
    except ValueError as e:
      _fail(str(e))
  results, train_seconds = {}, 0.0
  for name in args.task:
    rows, grids, task = run_task(args, name, plain, tuned, mesh, lrs,
                                 args.out)
    results[name] = {"description": task.description,
                     "num_params": task.num_params,
                     **report.to_dict(rows, grids)}
    train_seconds += report.train_seconds(rows, grids)
  return results, train_seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of ``python -m optax_sign.bench`` and ``optax-sign-bench``."""
  require_extras()
  args = parser().parse_args(argv)
  if args.list:
    print(list_optimizers())
    return 0
  _check(args)
  multi = args.workers > 1
  if multi:
    from optax_sign.bench import distributed  # pylint: disable=g-import-not-at-top
    distributed.request_devices(args.workers)
  plain, tuned, lrs = _select(args, multi)
  if not plain and not tuned:
    _fail("no optimizer to run (name some with --optimizers or --grid)")
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    _fail(f"cannot create output folder {args.out!r}: {e}")

  from optax_sign.bench import report  # pylint: disable=g-import-not-at-top
  from optax_sign.bench import runner  # pylint: disable=g-import-not-at-top
  cache = _cache_dir(args)
  with compile_cache(cache), runner.CompileClock() as clock:
    start = time.perf_counter()
    results, train_seconds = _run_tasks(args, plain, tuned, lrs)
    timing = report.timing(time.perf_counter() - start, clock, train_seconds,
                           cache)
  config = {k: v for k, v in vars(args).items() if k != "list"}
  config["lr"] = lrs
  path = os.path.join(args.out, "results.json")
  report.write_json(path, config, results, timing)
  print(f"\nresults: {path}")
  print(report.timing_summary(timing), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
