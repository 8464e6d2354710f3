"""Helper of ``benchmarks/gpu.sh``: runs its parts and writes the report.

Commands (``OUT`` is the output folder)::

  python benchmarks/gpu_report.py device
  python benchmarks/gpu_report.py step-time OUT [step_time options...]
  python benchmarks/gpu_report.py wire OUT [--size D] [--workers N...]
  python benchmarks/gpu_report.py report OUT

``device`` prints the backend, the device count and the device kind.
``step-time`` runs :func:`optax_sign.bench.step_time.main` and writes its
results to ``OUT/step_time.json``; ``wire`` runs the vote-bytes measurement
of :mod:`optax_sign.bench.wire` on simulated CPU devices (whatever
accelerator there is) and writes ``OUT/wire.json``. ``report`` gathers
those, the training run's ``OUT/train/results.json`` and the parts' exit
codes (``OUT/parts.tsv``, written by ``gpu.sh``) into ``OUT/report.md`` and
``OUT/summary.json``; a part that failed or ran out of time shows as such.
Every JSON names the device it ran on (``jax.devices()[0].device_kind``).
"""

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

import jax

from optax_sign.bench import report as bench_report

STEP_TIME_JSON = "step_time.json"
WIRE_JSON = "wire.json"
TRAIN_JSON = os.path.join("train", "results.json")
PARTS_TSV = "parts.tsv"


def device_info() -> dict:
  """The backend and devices JAX sees in this process."""
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_count": len(devices),
          "device_kind": devices[0].device_kind, "jax": jax.__version__}


def _write_json(path: str, payload: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(bench_report.json_safe(payload), f, indent=1)


def _read_json(path: str) -> Optional[dict]:
  """The JSON at ``path``, or None when the part did not write it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def step_time(out: str, argv: Sequence[str]) -> None:
  """``optax_sign.bench.step_time`` (it prints its table) into JSON."""
  from optax_sign.bench import step_time as step_time_lib  # pylint: disable=g-import-not-at-top
  results = step_time_lib.main(list(argv))
  _write_json(os.path.join(out, STEP_TIME_JSON),
              {"device": device_info(), "argv": list(argv),
               "results": results})


def wire(out: str, argv: Sequence[str]) -> None:
  """``optax_sign.bench.wire``'s bytes per parameter into JSON."""
  parser = argparse.ArgumentParser(prog="gpu_report.py wire")
  parser.add_argument("--size", type=int, default=1 << 18)
  parser.add_argument("--workers", type=int, nargs="+",
                      default=[2, 4, 8, 16, 64])
  args = parser.parse_args(argv)
  # Before JAX starts: CPU devices, as many as the largest worker count.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", max(args.workers))
  from optax_sign.bench import wire as wire_lib  # pylint: disable=g-import-not-at-top
  rows = wire_lib.measure(args.workers, args.size)
  print(f"bytes sent per worker per parameter per step, d={args.size}, "
        f"{jax.device_count()} simulated {jax.default_backend()} devices")
  print(wire_lib.format_table(rows))
  _write_json(os.path.join(out, WIRE_JSON),
              {"device": device_info(), "size": args.size,
               "workers": args.workers, "rows": rows})


def _cell(value, spec: str = ".3g") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list:
  """Markdown table lines."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def _parts(out: str) -> list:
  """(name, exit code, seconds, command) of every part ``gpu.sh`` ran."""
  try:
    with open(os.path.join(out, PARTS_TSV), encoding="utf-8") as f:
      return [[field.strip() for field in line.split("\t", 3)]
              for line in f if line.strip()]
  except OSError:
    return []


def _status(rc: str) -> str:
  return {"0": "ok", "124": "timed out", "137": "killed (timeout)"}.get(
      rc, f"failed (exit {rc})")


def _step_time_section(data: Optional[dict]) -> list:
  if data is None:
    return ["## Update-step time", "", "No result (see the parts below)."]
  d = data["device"]
  lines = ["## Update-step time", "",
           f"`optax_sign.bench.step_time {' '.join(data['argv'])}` on "
           f"{d['device_kind']} ({d['backend']}): median (min) ms of one "
           "jitted update, ratios to optax.lion / optax.adamw / a copy floor, "
           "state bytes, XLA's bytes accessed and temporaries per parameter.",
           ""]
  rows = [[name, _cell(r["ms"], ".3f"), _cell(r["min_ms"], ".3f"),
           _cell(r["vs_lion"], ".2f"), _cell(r["vs_adamw"], ".2f"),
           _cell(r["vs_copy"], ".2f"), _cell(r["bytes_per_param"], ".3f"),
           _cell(r["accessed_per_param"], ".2f"),
           _cell(r["temp_per_param"], ".2f")]
          for name, r in data["results"].items()]
  return lines + _table(["optimizer", "ms", "min ms", "x lion", "x adamw",
                         "x copy", "state B/p", "XLA B/p", "temp B/p"], rows)


def _wire_section(data: Optional[dict]) -> list:
  if data is None:
    return ["## Vote bytes on the wire", "", "No result (see the parts below)."]
  d = data["device"]
  lines = ["## Vote bytes on the wire", "",
           f"`optax_sign.bench.wire --size {data['size']}`: bytes sent per "
           f"worker per parameter per step, from the compiled HLO, on "
           f"{d['device_count']} simulated {d['backend']} devices "
           f"({d['device_kind']}). The counts do not depend on the device; "
           "one accelerator is too few workers for a vote.", ""]
  baseline, rows = {}, []
  for r in data["rows"]:
    if r["scheme"] == "fp32 pmean":
      baseline[r["workers"]] = r["hlo"]
    ratio = baseline[r["workers"]] / r["hlo"] if r["hlo"] else math.inf
    rows.append([str(r["workers"]), r["scheme"], r["tie"],
                 _cell(r["hlo"], ".4f"), _cell(r["formula"], ".4f"),
                 _cell(ratio, ".1f") + "x"])
  return lines + _table(["N", "scheme", "tie", "HLO B/param", "formula",
                         "vs fp32"], rows)


def _train_rows(task: dict) -> list:
  rows = []
  for row in task["rows"]:
    run = row["run"]
    steps = run["steps"][-1] if run["steps"] else 0
    ms = 1e3 * run["seconds"][-1] / steps if steps else None
    metrics = row["final_metrics"]
    rows.append([row["label"], _cell(run["learning_rate"]),
                 _cell(row["final_loss"], ".4g"),
                 _percent(metrics.get("test_accuracy")), str(steps),
                 _cell(ms, ".3f"), _cell(run["compile_seconds"], ".2f")])
  return rows


def _train_section(data: Optional[dict]) -> list:
  if data is None:
    return ["## Training", "", "No result (see the parts below)."]
  m, t = data["machine"], data.get("timing", {})
  lines = ["## Training", "",
           f"`python -m optax_sign.bench` on {m['device']} ({m['backend']}): "
           f"{_cell(t.get('total_seconds'), '.1f')} s in all, compile "
           f"{_cell(t.get('compile_seconds'), '.1f')} s ({t.get('compiled')} "
           f"programs compiled, {t.get('cache_hits')} from the cache), "
           f"training steps {_cell(t.get('train_seconds'), '.1f')} s."]
  for name, task in data["results"].items():
    lines += ["", f"### {name}: {task['description']}", ""]
    lines += _table(["optimizer", "lr", "final loss", "test acc", "steps",
                     "ms/step", "compile s"], _train_rows(task))
  return lines


def _device_line(step: Optional[dict], train: Optional[dict]) -> str:
  if step is not None:
    d = step["device"]
    return (f"{d['device_kind']} ({d['backend']}, {d['device_count']} "
            f"device(s), JAX {d['jax']})")
  if train is not None:
    return f"{train['machine']['device']} ({train['machine']['backend']})"
  return "unknown (no part finished)"


def report(out: str) -> str:
  """Writes ``OUT/report.md`` and ``OUT/summary.json``; returns the text."""
  step = _read_json(os.path.join(out, STEP_TIME_JSON))
  votes = _read_json(os.path.join(out, WIRE_JSON))
  train = _read_json(os.path.join(out, TRAIN_JSON))
  parts = _parts(out)
  device = _device_line(step, train)
  lines = [f"# optax_sign on {device}", ""]
  lines += _step_time_section(step) + [""]
  lines += _wire_section(votes) + [""]
  lines += _train_section(train) + ["", "## Parts", ""]
  lines += _table(["part", "status", "seconds", "command"],
                  [[n, _status(rc), s, f"`{cmd}`"] for n, rc, s, cmd in parts])
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  _write_json(os.path.join(out, "summary.json"), {
      "device": device, "step_time": step, "wire": votes,
      "train": None if train is None else {
          "machine": train["machine"], "timing": train.get("timing")},
      "parts": [{"part": n, "exit_code": int(rc), "seconds": int(s),
                 "command": cmd} for n, rc, s, cmd in parts]})
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = ("device", "step-time", "wire", "report")
  if not argv or argv[0] not in commands or (argv[0] != "device"
                                              and len(argv) < 2):
    print(__doc__, file=sys.stderr)
    return 2
  command, rest = argv[0], argv[1:]
  if command == "device":
    d = device_info()
    print(d["backend"], d["device_count"], d["device_kind"])
  elif command == "step-time":
    step_time(rest[0], rest[1:])
  elif command == "wire":
    wire(rest[0], rest[1:])
  else:
    print(report(rest[0]), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
