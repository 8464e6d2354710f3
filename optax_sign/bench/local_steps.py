"""Local-steps benchmark: DSM-LS vs DiLoCo vs SlowMo vs averaging vs sync AdamW.

The character-level Transformer of :func:`optax_sign.bench.tasks.charlm`
(Flax NNX) on the standard library's ``pydoc_data.topics`` English text (or
any UTF-8 file with ``--data``); the validation loss is the task's held-out
``val_loss`` (the last 10% of the text, never trained on). ``--workers``
simulated workers (a named ``vmap``) each draw their own mini-batches; at
every step all methods see exactly the same tokens (synchronous AdamW takes
one step on the union of the workers' batches). The local-steps methods
communicate once every ``--tau`` steps, AdamW every step. The reported model
is the anchor (the global model at a round boundary).

Each outer optimizer gets its own sweep, by default the same number of
configurations (2 learning rates x 2 momenta, each including its released or
published defaults), and synchronous AdamW may sweep its learning rate
(``--adamw-lr``). With ``--seeds`` every configuration runs once per seed
(model initialisation and data stream) and is reported as the mean and
standard deviation over seeds. Results go to ``local_steps.json`` and
``local_steps.png`` (mean validation loss against all-reduces and against
steps) in ``--out``, and a table is printed.

  python -m optax_sign.bench.local_steps     # 14 runs, 1-2 min each on 2 CPUs
  python -m optax_sign.bench.local_steps --tiny --out /tmp/ls   # seconds
"""

import argparse
import dataclasses
import functools
import itertools
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sign
from optax_sign.bench import report
from optax_sign.bench import tasks as task_lib

AXIS = "workers"
METHODS = ("adamw", "dsm_ls", "diloco", "slowmo", "averaging")
LABELS = {"adamw": "sync AdamW", "dsm_ls": "DSM-LS", "diloco": "DiLoCo",
          "slowmo": "SlowMo", "averaging": "averaging"}


@dataclasses.dataclass(frozen=True)
class Config:
  """One benchmarked configuration: a method and its outer hyperparameters."""
  method: str
  hparams: tuple = ()  # sorted (name, value) pairs

  @property
  def settings(self) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in self.hparams) or "-"


def inner_adamw(schedule: optax.Schedule,
                weight_decay: float) -> optax.GradientTransformation:
  """The per-worker (and synchronous) AdamW: betas (0.9, 0.95), eps 1e-8."""
  return optax.adamw(schedule, 0.9, 0.95, 1e-8, weight_decay=weight_decay,
                     mask=optax_sign.matrix_mask)


def build(config: Config, schedule: optax.Schedule, tau: int,
          seed: int = 0) -> optax.GradientTransformation:
  """The optimizer of ``config``; the inner AdamW uses ``schedule``.

  Weight decay 0.1 on matrices has one home per method: the inner AdamW for
  AdamW, DiLoCo, SlowMo and averaging; the anchor, once per round, for DSM-LS
  (the ``dsm_ls`` preset's rule). A DSM-LS ``inner_wd > 0`` selects the
  released code's configuration instead: inner decay ``inner_wd`` on matrices
  and outer decay 0.1 on every leaf. ``inner_learning_rate`` is the very schedule
  the inner AdamW uses.
  """
  h = dict(config.hparams)
  if config.method == "adamw":  # its learning rate is in the schedule
    return inner_adamw(schedule, 0.1)
  if config.method == "dsm_ls":
    key = jax.random.key(seed) if "bound" in h else None
    inner_wd = h.get("inner_wd", 0.0)  # > 0: the released code's two decays
    return optax_sign.dsm_ls(
        schedule, inner_adamw(schedule, inner_wd), tau, AXIS,
        learning_rate=h["eta"], b1=h["b1"], b2=h["b2"], weight_decay=0.1,
        mask=None if inner_wd else optax_sign.matrix_mask, key=key,
        bound=h.get("bound"))
  if config.method == "diloco":
    return optax_sign.diloco(schedule, inner_adamw(schedule, 0.1), tau, AXIS,
                             learning_rate=h["lr"], momentum=h["momentum"])
  if config.method == "slowmo":
    return optax_sign.slowmo(schedule, inner_adamw(schedule, 0.1), tau, AXIS,
                             learning_rate=h["lr"], momentum=h["momentum"])
  if config.method == "averaging":
    return optax_sign.model_averaging(schedule, inner_adamw(schedule, 0.1),
                                      tau, AXIS)
  raise ValueError(f"unknown method {config.method!r}; choose from "
                   f"{', '.join(METHODS)}")


def _jit_eval(task: task_lib.Task):
  """``jax.jit(task.eval_metrics)`` (the charlm tasks hold out windows)."""
  if task.eval_metrics is None:
    raise ValueError(f"task {task.name!r} has no held-out evaluation")
  return jax.jit(task.eval_metrics)


def train(config: Config, task: task_lib.Task, *, steps: int, workers: int, tau: int, lr: float,
          eval_every: int, seed: int = 0, progress: bool = True,
          evaluate=None) -> dict:
  """Trains one configuration; returns its validation curve and all-reduces.

  ``evaluate`` (default ``jax.jit(task.eval_metrics)``) may be shared by
  runs.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  lr = dict(config.hparams).get("lr", lr) if config.method == "adamw" else lr
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, steps // 10), steps, lr / 10)
  tx = build(config, schedule, tau, seed)
  sync = config.method == "adamw"
  base = jax.random.key(seed)
  worker_ids = jnp.arange(workers)

  def worker_keys(t):  # the same tokens for every method at step t
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, t),
                                                 i))(worker_ids)

  def one_update(params, state, batch):
    grads = jax.grad(task.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def step(carry, t, data):
    params, state = carry
    keys = worker_keys(t)
    if sync:
      batch = jax.vmap(lambda k: task.sample(data, k))(keys)
      batch = batch.reshape((-1,) + batch.shape[2:])
      return one_update(params, state, batch), None
    local = jax.vmap(
        lambda p, s, k: one_update(p, s, task.sample(data, k)), axis_name=AXIS)
    return local(params, state, keys), None

  @functools.partial(jax.jit, static_argnums=3)
  def advance(carry, data, start, length):
    return jax.lax.scan(functools.partial(step, data=data), carry,
                        start + jnp.arange(length))[0]

  params = jax.tree.map(jnp.asarray, task.params)
  state = tx.init(params)
  if not sync:
    stack = lambda x: jnp.broadcast_to(x, (workers,) + jnp.shape(x))
    params, state = jax.tree.map(stack, (params, state))
  evaluate = evaluate or _jit_eval(task)

  def val_loss(params, state):
    model = params if sync else jax.tree.map(
        lambda x: x[0], optax_sign.local_steps_anchor(state))
    return float(evaluate(model, task.heldout)["val_loss"])

  record: dict[str, Any] = {"method": config.method, "label": LABELS[config.method],
            "hparams": dict(config.hparams), "settings": config.settings,
            "seed": seed, "steps": [0], "allreduces": [0],
            "val_loss": [val_loss(params, state)]}
  carry = (params, state)
  start = time.perf_counter()
  bar = tqdm(total=steps, disable=not progress, leave=False,
             desc=f"{LABELS[config.method]} {config.settings}")
  for t in range(0, steps, eval_every):
    length = min(eval_every, steps - t)
    carry = advance(carry, task.data, t, length)
    done = t + length
    record["steps"].append(done)
    record["allreduces"].append(done if sync else done // tau)
    record["val_loss"].append(val_loss(*carry))
    bar.set_postfix(val=f"{record['val_loss'][-1]:.4f}", refresh=False)
    bar.update(length)
  bar.close()
  record["final_val_loss"] = record["val_loss"][-1]
  record["total_allreduces"] = record["allreduces"][-1]
  record["seconds"] = time.perf_counter() - start
  return record


def configs(args: argparse.Namespace) -> list:
  """The configurations to run, from the sweep arguments."""
  out = []
  for method in args.methods:
    if method == "dsm_ls":
      grid = [dict(eta=e, b1=b1, b2=b2) for e, (b1, b2) in
              itertools.product(args.dsm_ls_eta, args.dsm_ls_betas)]
      grid = [dict(g, inner_wd=w) if w else g
              for w in args.dsm_ls_inner_decay for g in grid]
      if args.dsm_ls_bound:
        grid += [dict(g, bound=args.dsm_ls_bound) for g in grid]
    elif method in ("diloco", "slowmo"):
      grid = [dict(lr=a, momentum=m) for a, m in itertools.product(
          getattr(args, f"{method}_lr"), getattr(args, f"{method}_momentum"))]
    elif method == "adamw" and args.adamw_lr:
      grid = [dict(lr=a) for a in args.adamw_lr]
    else:
      grid = [{}]
    out += [Config(method, tuple(sorted(g.items()))) for g in grid]
  return out


def summarize(runs: Sequence[dict]) -> list:
  """One entry per configuration: mean curve and mean/std final loss over seeds.

  Runs of a configuration share their evaluation points (same steps).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r["method"], r["settings"]), []).append(r)
  out = []
  for group in groups.values():
    finals = np.array([r["final_val_loss"] for r in group])
    first = group[0]
    out.append({
        "method": first["method"], "label": first["label"],
        "hparams": first["hparams"], "settings": first["settings"],
        "seeds": [r["seed"] for r in group],
        "steps": first["steps"], "allreduces": first["allreduces"],
        "val_loss": np.mean([r["val_loss"] for r in group], axis=0).tolist(),
        "final_val_loss": float(finals.mean()),
        "final_val_loss_std": float(finals.std(ddof=1)) if finals.size > 1
                              else 0.0,
        "total_allreduces": first["total_allreduces"]})
  return out


def table(runs: Sequence[dict], reference: Optional[float]) -> str:
  """Method, settings, final validation loss (mean +- std over seeds when
  there are several), % vs the best sync AdamW, all-reduces; ``runs`` are
  :func:`summarize` entries."""
  best: dict[str, dict] = {}
  for r in runs:
    if (r["method"] not in best
        or r["final_val_loss"] < best[r["method"]]["final_val_loss"]):
      best[r["method"]] = r
  spread = any(len(r["seeds"]) > 1 for r in runs)
  lines = [f"{'method':11s} {'settings':34s} {'val loss':>9s} "
           + (f"{'std':>7s} " if spread else "")
           + f"{'vs AdamW':>9s} {'all-reduces':>11s}"]
  for r in runs:
    pct = ("" if reference is None
           else f"{100 * (r['final_val_loss'] / reference - 1):+.1f}%")
    mark = " *" if best[r["method"]] is r and r["method"] != "adamw" else ""
    std = f"{r['final_val_loss_std']:7.4f} " if spread else ""
    lines.append(f"{r['label']:11s} {r['settings']:34s} "
                 f"{r['final_val_loss']:9.4f} {std}{pct:>9s} "
                 f"{r['total_allreduces']:11d}{mark}")
  lines.append("* best configuration of the method"
               + (f" (mean over {len(runs[0]['seeds'])} seeds)"
                  if spread else ""))
  return "\n".join(lines)


def plot(path: str, runs: Sequence[dict], title: str) -> None:
  """Validation loss against all-reduces (log) and against steps; the best
  configuration of each method solid, the rest of its sweep faint; ``runs``
  are :func:`summarize` entries (mean curves over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for method in METHODS:
    mine = [r for r in runs if r["method"] == method]
    if not mine:
      continue
    top = min(mine, key=lambda r: r["final_val_loss"])
    for r in mine:
      label = f"{r['label']} {r['settings']}".replace(" -", "")
      style = dict(color=colors[method], alpha=1.0 if r is top else 0.25,
                   lw=1.8 if r is top else 0.8,
                   label=label if r is top else None)
      # The log axis starts at the first all-reduce (the initial point has 0).
      axes[0].plot(r["allreduces"][1:], r["val_loss"][1:], **style)
      axes[1].plot(r["steps"], r["val_loss"], **style)
  axes[0].set_xscale("log")
  axes[0].set_xlabel("communication rounds (all-reduces)")
  axes[1].set_xlabel("steps (equal tokens)")
  for ax in axes:
    ax.set_ylabel("validation loss (nats/char)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _pair(text: str):
  try:
    b1, b2 = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected B1,B2 (e.g. 0.95,0.98), got {text!r}") from None
  return b1, b2


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m optax_sign.bench.local_steps",
      description="Local steps on a character Transformer: DSM-LS vs DiLoCo "
                  "vs SlowMo vs model averaging vs synchronous AdamW.")
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--steps", type=int, default=None,
                 help="local steps per worker (a multiple of --tau; default "
                 "720, tiny 8)")
  p.add_argument("--workers", type=int, default=None,
                 help="simulated workers (default 4, tiny 2)")
  p.add_argument("--tau", type=int, default=None,
                 help="steps per communication round (default 12, tiny 4)")
  p.add_argument("--lr", type=float, default=3e-3,
                 help="peak inner AdamW learning rate (warmup 10%%, cosine to "
                 "lr/10), the same for every method")
  p.add_argument("--adamw-lr", nargs="+", type=float, default=None,
                 help="synchronous AdamW peak learning rate sweep (default: "
                 "--lr only)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="windows per worker and step (default 16, tiny 4)")
  p.add_argument("--dsm-ls-eta", nargs="+", type=float, default=[3.0, 6.0],
                 help="DSM-LS global lr sweep (default 3 6)")
  p.add_argument("--dsm-ls-betas", nargs="+", type=_pair,
                 default=[(0.95, 0.98), (0.5, 0.9)], metavar="B1,B2",
                 help="DSM-LS (b1, b2) pairs (default: the released 0.95,0.98 "
                 "and 0.5,0.9, a momentum horizon suited to tens of rounds)")
  p.add_argument("--dsm-ls-inner-decay", nargs="+", type=float,
                 default=[0.0], help="DSM-LS inner AdamW decay sweep; a "
                 "value > 0 also decays every leaf of the anchor (the "
                 "released code's two decays; default 0: decay once, on the "
                 "anchor's matrices)")
  p.add_argument("--dsm-ls-bound", type=float, default=None,
                 help="also run every DSM-LS configuration with the "
                 "randomized sign of this bound")
  p.add_argument("--diloco-lr", nargs="+", type=float, default=[0.35, 0.7],
                 help="DiLoCo outer lr sweep (default 0.35 and the published "
                 "0.7)")
  p.add_argument("--diloco-momentum", nargs="+", type=float,
                 default=[0.9, 0.5], help="DiLoCo Nesterov momentum sweep "
                 "(default the published 0.9 and 0.5)")
  p.add_argument("--slowmo-lr", nargs="+", type=float, default=[0.5, 1.0],
                 help="SlowMo slow lr sweep (default 0.5 and the released 1)")
  p.add_argument("--slowmo-momentum", nargs="+", type=float,
                 default=[0.2, 0.5], help="SlowMo momentum sweep (default "
                 "the released 0.2 and fairscale's 0.5)")
  p.add_argument("--eval-every", type=int, default=None,
                 help="rounds between validation points (default: about 30 "
                 "points)")
  p.add_argument("--val-windows", type=int, default=None,
                 help="evenly spaced held-out windows for the validation loss "
                 "(default 512, tiny 16)")
  p.add_argument("--data", default=None, help="a UTF-8 text file (default: "
                 "pydoc_data.topics)")
  p.add_argument("--seeds", nargs="+", type=int, default=[0],
                 help="seeds (model initialisation and data); each "
                 "configuration runs once per seed (default 0)")
  p.add_argument("--tiny", action="store_true",
                 help="tiny text, model and steps (tests, smoke runs)")
  p.add_argument("--out", default="bench_local_steps",
                 help="output folder for local_steps.json and local_steps.png")
  p.add_argument("--no-progress", action="store_true")
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark; returns the JSON payload's ``results``."""
  args = parser().parse_args(argv)
  tiny = args.tiny
  steps = args.steps or (8 if tiny else 720)
  workers = args.workers or (2 if tiny else 4)
  tau = args.tau or (4 if tiny else 12)
  batch = args.batch_size or (4 if tiny else 16)
  if steps % tau:
    raise SystemExit(f"--steps {steps} must be a multiple of --tau {tau} (the "
                     "run ends on a sync)")
  rounds = steps // tau
  eval_every = tau * (args.eval_every or max(1, rounds // 30))
  os.makedirs(args.out, exist_ok=True)
  runs: list[dict] = []
  for seed in args.seeds:
    task = task_lib.charlm(args.data, batch_size=batch, tiny=tiny, seed=seed,
                           val_windows=args.val_windows or (16 if tiny else 512))
    if not runs:
      context = task.sample(task.data, jax.random.key(0)).shape[1] - 1
      print(f"{task.description}; {task.num_params} parameters; {workers} "
            f"workers x {batch} windows; tau={tau}; {steps} steps ({rounds} "
            f"rounds); inner AdamW lr {args.lr:g}; seeds {args.seeds}",
            flush=True)
    evaluate = _jit_eval(task)
    for config in configs(args):
      run = train(config, task, steps=steps, workers=workers, tau=tau,
                  lr=args.lr, eval_every=eval_every, seed=seed,
                  progress=not args.no_progress, evaluate=evaluate)
      runs.append(run)
      print(f"  {run['label']:11s} {run['settings']:34s} seed {seed} val "
            f"{run['final_val_loss']:.4f}  ({run['seconds']:.0f} s)",
            flush=True)
  summary = summarize(runs)
  reference = min((r["final_val_loss"] for r in summary
                   if r["method"] == "adamw"), default=None)
  print(table(summary, reference), flush=True)
  config = {k: v for k, v in vars(args).items()}
  config.update(steps=steps, workers=workers, tau=tau, batch_size=batch,
                rounds=rounds, tokens_per_step=workers * batch * context,
                num_params=task.num_params, task=task.description)
  results = {"runs": runs, "summary": summary,
             "sync_adamw_val_loss": reference}
  report.write_json(os.path.join(args.out, "local_steps.json"), config, results)
  png = os.path.join(args.out, "local_steps.png")
  plot(png, summary, f"{task.description}; {workers} workers, tau={tau}, "
       f"{steps} steps, {len(args.seeds)} seed(s)")
  print(f"results: {os.path.join(args.out, 'local_steps.json')}, plot: {png}")
  return results


if __name__ == "__main__":
  main()
