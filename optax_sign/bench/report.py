"""Reports: the printed table, the JSON results and the PNG plots.

The table shows the training objective (``final loss``, ``best loss``) and,
side by side, the task's held-out metrics at the end of the run (``test
loss``, ``test acc``, ``val loss``). A grid's best run is the one with the
lowest final *training* loss (:data:`GRID_SELECTION`): the held-out data is
never used to tune, so its metrics stay honest estimates for every row.
The run's time splits into compilation, training steps and the rest
(:func:`timing`).
"""

import dataclasses
import json
import math
import os
import platform
from typing import Optional, Sequence

import jax

from optax_sign.bench import runner

_COLUMNS = ("optimizer", "lr", "final loss", "best loss", "steps", "seconds",
            "ms/step", "compile s", "tuning runs", "tuning s")
# Printed names of the held-out metrics (others print with spaces for "_").
_METRIC_LABELS = {"test_loss": "test loss", "test_accuracy": "test acc",
                  "val_loss": "val loss"}
GRID_SELECTION = "final training loss"


def metric_label(name: str) -> str:
  return _METRIC_LABELS.get(name, name.replace("_", " "))


def _fmt_metric(name: str, value) -> str:
  """Accuracies as percentages, other metrics like losses."""
  if value is not None and name.endswith("accuracy") and math.isfinite(value):
    return f"{100 * value:.2f}%"
  return _fmt(value)


def _metric_names(runs) -> list:
  """Held-out metric names: the known ones in table order, then the others."""
  names = {k for run in runs for k in run.metrics}
  order = list(_METRIC_LABELS)
  return sorted(names, key=lambda k: (order.index(k) if k in order
                                      else len(order), k))


@dataclasses.dataclass
class Row:
  """One line of the table: a run and the compute spent to choose it."""
  label: str
  run: runner.Run
  tuning_runs: int = 1
  tuning_steps: int = 0
  tuning_seconds: float = 0.0

  def __post_init__(self):
    if not self.tuning_steps:
      self.tuning_steps = self.run.num_steps
      self.tuning_seconds = self.run.total_seconds


@dataclasses.dataclass
class Grid:
  """A learning-rate grid of one baseline and its best run."""
  optimizer: str
  runs: list

  @property
  def best(self) -> runner.Run:
    return min(self.runs, key=lambda r: (r.diverged, r.final_loss
                                         if math.isfinite(r.final_loss)
                                         else math.inf))

  @property
  def total_steps(self) -> int:
    return sum(r.num_steps for r in self.runs)

  @property
  def total_seconds(self) -> float:
    return sum(r.total_seconds for r in self.runs)

  def row(self) -> Row:
    return Row(f"{self.optimizer} (grid best)", self.best, len(self.runs),
               self.total_steps, self.total_seconds)


def _fmt(value, spec: str = ".4g") -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else "inf"
  return format(value, spec)


def table(rows: Sequence[Row], num_params: int,
          multi_worker: bool = False) -> str:
  """A plain-text table, one line per row.

  Held-out metric columns follow ``best loss``; when a row is a grid's best,
  a footer says how it was chosen.
  """
  metrics = _metric_names(row.run for row in rows)
  columns = list(_COLUMNS)
  columns[4:4] = [metric_label(m) for m in metrics]
  if multi_worker:
    columns += ["B/step/worker", "B/param/step"]
  lines = []
  for row in rows:
    run = row.run
    ms = (1e3 * run.total_seconds / run.num_steps) if run.num_steps else None
    cells = [row.label, _fmt(run.learning_rate, ".3g"),
             _fmt(run.final_loss), _fmt(run.best_loss), str(run.num_steps),
             _fmt(run.total_seconds, ".2f"), _fmt(ms, ".3f"),
             _fmt(run.compile_seconds, ".2f"), str(row.tuning_runs),
             _fmt(row.tuning_seconds, ".2f")]
    final = run.final_metrics
    cells[4:4] = [_fmt_metric(m, final.get(m)) for m in metrics]
    if multi_worker:
      per_step = None
      if run.bytes_per_step is not None:
        per_step = run.bytes_per_step / run.sync_every
      cells += [_fmt(per_step, ".6g"),
                _fmt(None if per_step is None else per_step / num_params,
                     ".4g")]
    lines.append(cells)
  widths = [max(len(c), *(len(line[i]) for line in lines))
            for i, c in enumerate(columns)]
  out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
         "  ".join("-" * w for w in widths)]
  out += ["  ".join(c.ljust(w) for c, w in zip(line, widths))
          for line in lines]
  if any(row.tuning_runs > 1 for row in rows):
    out.append(f"(grid best = the grid point with the lowest {GRID_SELECTION}"
               + ("; held-out metrics are not used to tune" if metrics else "")
               + "; tuning runs/s count the whole grid)")
  return "\n".join(out)


def grid_summary(grids: Sequence[Grid]) -> str:
  lines = []
  for g in grids:
    pairs = ", ".join(f"{r.learning_rate:.3g}: {_fmt(r.final_loss)}"
                      for r in g.runs)
    lines.append(f"grid {g.optimizer}: final loss by lr {{{pairs}}}; best lr "
                 f"{g.best.learning_rate:.3g}; total {len(g.runs)} runs, "
                 f"{g.total_steps} steps, {g.total_seconds:.2f} s")
    for m in _metric_names(g.runs):
      pairs = ", ".join(
          f"{r.learning_rate:.3g}: {_fmt_metric(m, r.final_metrics.get(m))}"
          for r in g.runs)
      lines.append(f"grid {g.optimizer}: {metric_label(m)} by lr {{{pairs}}}")
  return "\n".join(lines)


def machine() -> dict:
  """Where the numbers came from."""
  device = jax.devices()[0]
  return {"platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)),
          "cpu_count": os.cpu_count()}


def train_seconds(rows: Sequence[Row], grids: Sequence[Grid] = ()) -> float:
  """Seconds of timed training steps of one task, every run counted once."""
  runs = {id(row.run): row.run for row in rows}
  runs.update((id(run), run) for grid in grids for run in grid.runs)
  return sum(run.total_seconds for run in runs.values())


def timing(total: float, clock: "runner.CompileClock", train: float,
           cache_dir: Optional[str] = None) -> dict:
  """Where the seconds of a benchmark run went (the ``timing`` of the JSON).

  ``compile_seconds``: JAX tracing, lowering and compiling (or loading from
  the persistent cache) every program; ``train_seconds``: the timed training
  steps (:func:`train_seconds` summed over the tasks); ``other_seconds``: the
  rest (data, initialization, evaluation, plots).
  """
  return {"total_seconds": total, "compile_seconds": clock.seconds,
          "train_seconds": train,
          "other_seconds": total - clock.seconds - train,
          "programs": clock.programs, "compiled": clock.compiled,
          "cache_hits": clock.cache_hits, "compile_cache": cache_dir}


def timing_summary(t: dict) -> str:
  """Two lines on :func:`timing`: the split of the time, and the cache."""
  cache = (f"compile cache: {t['compile_cache']}" if t["compile_cache"]
           else "compile cache: off")
  return (f"time: {t['total_seconds']:.1f} s = compile "
          f"{t['compile_seconds']:.1f} s ({t['programs']} programs: "
          f"{t['compiled']} compiled, {t['cache_hits']} from the cache) + "
          f"training steps {t['train_seconds']:.1f} s + other "
          f"{t['other_seconds']:.1f} s (data, evaluation, plots)\n{cache}")


def write_json(path: str, config: dict, results: dict,
               timing_info: Optional[dict] = None) -> None:
  """``results.json``: the settings, the machine, the results and the timing."""
  payload = {"config": config, "machine": machine(), "results": results}
  if timing_info is not None:
    payload["timing"] = timing_info
  with open(path, "w", encoding="utf-8") as f:
    json.dump(json_safe(payload), f, indent=1)


def json_safe(obj):
  """JSON has no NaN or inf: they become null."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, runner.Run):
    return json_safe(dataclasses.asdict(obj))
  return obj


def plot(path: str, title: str, rows: Sequence[Row],
         grids: Sequence[Grid] = (), multi_worker: bool = False) -> None:
  """Loss against steps and wall time (and bytes, and the stepsize)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  has_bytes = multi_worker and any(r.run.bytes for r in rows)
  has_size = any(r.run.stepsize for r in rows)
  panels = ["step", "seconds"] + (["bytes"] * has_bytes) + (["stepsize"]
                                                             * has_size)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6),
                           squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, row in enumerate(rows):
    run, color = row.run, colors[i % len(colors)]
    xs = {"step": run.steps, "seconds": run.seconds, "bytes": run.bytes}
    for ax, panel in zip(axes[0], panels):
      if panel == "stepsize":
        if run.stepsize:
          ax.semilogy(run.steps[:len(run.stepsize)], run.stepsize,
                      label=row.label, color=color)
        elif run.learning_rate is not None:
          ax.axhline(run.learning_rate, color=color, ls=":", label=row.label)
        continue
      x = xs[panel]
      if panel == "bytes" and not x:
        continue
      ax.plot(x, run.loss[:len(x)], label=row.label, color=color)
  top = max((max(r.run.loss) for r in rows if r.run.loss), default=None)
  for grid in grids:  # the other grid points, faint, on the step panel
    for run in grid.runs:
      if run is not grid.best:
        axes[0][0].plot(run.steps, run.loss, color="gray", alpha=0.3, lw=0.8)
  labels = {"step": "step", "seconds": "wall time (s, steps only)",
            "bytes": "bytes sent per worker", "stepsize": "step"}
  for ax, panel in zip(axes[0], panels):
    ax.set_xlabel(labels[panel])
    ax.set_ylabel("stepsize / learning rate" if panel == "stepsize" else "loss")
    if panel != "stepsize":
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  lows = [min(r.run.loss) for r in rows if r.run.loss]
  if grids and top is not None and math.isfinite(top) and min(lows) > 0:
    # Diverged grid points stay off-scale; limits set after the log scale.
    axes[0][0].set_ylim(bottom=0.8 * min(lows), top=1.5 * top)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def to_dict(rows: Sequence[Row], grids: Sequence[Grid]) -> dict:
  return {
      "rows": [{"label": r.label, "tuning_runs": r.tuning_runs,
                "tuning_steps": r.tuning_steps,
                "tuning_seconds": r.tuning_seconds,
                "final_loss": r.run.final_loss,
                "final_metrics": r.run.final_metrics, "run": r.run}
               for r in rows],
      "grids": [{"optimizer": g.optimizer,
                 "learning_rates": [r.learning_rate for r in g.runs],
                 "best_by": GRID_SELECTION,
                 "best_learning_rate": g.best.learning_rate,
                 "total_steps": g.total_steps,
                 "total_seconds": g.total_seconds, "runs": g.runs}
                for g in grids],
  }

