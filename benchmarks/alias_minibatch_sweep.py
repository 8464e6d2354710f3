"""Sweep of ALIAS's snapshot gap and direction momentum on a benchmark task.

    python benchmarks/alias_minibatch_sweep.py --task mlp --steps 300 \
        --gaps 1 5 10 20 50 100 --momenta 0 0.9 --seeds 0 1 2 \
        --grid 1e-4 3e-4 1e-3 3e-3 1e-2

prints, per configuration of ``alias_sign_sgd(update_gap=k, momentum=mu)``
and per learning rate of the ``optax.sign_sgd`` / ``optax.signum`` grid, the
final training loss averaged over the seeds (each seed's in brackets) and the
held-out metrics averaged likewise. ``alias_sign_sgd_stochastic``'s constants
come from this sweep (docs/algorithms/alias.md, "Mini-batches").
"""

import argparse
import itertools
import warnings

import numpy as np
import optax

import optax_sign
from optax_sign.bench import optimizers as opt_lib
from optax_sign.bench import runner
from optax_sign.bench import tasks


def _report(name, make, task, steps, seeds):
  entry = opt_lib.Entry(name, name, lambda lr, ctx: make())
  context = opt_lib.Context(steps=steps, f_lower=task.f_lower)
  stepper = runner.single_worker_stepper(task, entry, context, None)
  runs = [runner.train(stepper, runner.Run(name, None), steps, seed, steps,
                       progress=False) for seed in seeds]
  finals = [r.final_loss for r in runs]
  metrics = {k: np.mean([r.final_metrics[k] for r in runs])
             for k in runs[0].final_metrics}
  print(f"{name:24s} train {np.mean(finals):.4f} "
        f"({' '.join(f'{f:.4f}' for f in finals)}) "
        + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="mlp", choices=sorted(tasks.TASKS))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--gaps", type=int, nargs="+", default=[1, 10, 20])
  parser.add_argument("--momenta", type=float, nargs="+", default=[0.0, 0.9])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--grid", type=float, nargs="*", default=[])
  args = parser.parse_args()
  warnings.filterwarnings("ignore", category=RuntimeWarning)  # stall notes
  task = tasks.make_task(args.task)
  for k, mu in itertools.product(args.gaps, args.momenta):
    _report(f"alias gap{k} momentum{mu:g}",
            lambda k=k, mu=mu: optax_sign.alias_sign_sgd(update_gap=k,
                                                         momentum=mu),
            task, args.steps, args.seeds)
  for lr in args.grid:
    for name, make in (("sign_sgd", optax.sign_sgd), ("signum", optax.signum)):
      _report(f"{name} {lr:g}", lambda make=make, lr=lr: make(lr), task,
              args.steps, args.seeds)


if __name__ == "__main__":
  main()
