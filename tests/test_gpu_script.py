"""``benchmarks/gpu.sh`` in its quick mode, and its report of failed parts."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _helper():
  """``benchmarks/gpu_report.py`` as a module (it is no package)."""
  spec = importlib.util.spec_from_file_location(
      "gpu_report", ROOT / "benchmarks" / "gpu_report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _device_kind() -> str:
  """What a fresh process sees as ``jax.devices()[0].device_kind``."""
  return subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
      capture_output=True, text=True, check=True, timeout=120).stdout.strip()


def test_quick_run_writes_json_and_markdown_naming_the_device(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, QUICK="1", PYTHON=sys.executable,
             XDG_CACHE_HOME=str(tmp_path / "cache"))
  result = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  kind = _device_kind()
  if kind == "cpu":
    assert "No accelerator visible to JAX" in result.stdout
  text = (out / "report.md").read_text(encoding="utf-8")
  assert text.startswith(f"# optax_sign on {kind} (")
  for section in ("## Update-step time", "## Vote bytes on the wire",
                  "## Training", "## Parts", "| optax.lion |",
                  "| auto (allgather) |", "| alias |"):
    assert section in text, section
  summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
  assert summary["step_time"]["device"]["device_kind"] == kind
  assert summary["wire"]["device"]["backend"] == "cpu"  # simulated devices
  assert summary["train"]["machine"]["device"] == kind
  assert {"compile_seconds", "train_seconds"} <= set(summary["train"]["timing"])
  assert [(p["part"], p["exit_code"]) for p in summary["parts"]] == [
      ("step_time", 0), ("wire", 0), ("train", 0)]
  for name in ("step_time.json", "wire.json", "train/results.json"):
    assert (out / name).is_file(), name


def test_report_shows_parts_that_failed_or_timed_out(tmp_path):
  (tmp_path / "parts.tsv").write_text(
      "step_time\t124\t150\tpython x.py\nwire\t1\t3\tpython y.py\n",
      encoding="utf-8")
  text = _helper().report(str(tmp_path))
  assert text.startswith("# optax_sign on unknown (no part finished)")
  assert text.count("No result (see the parts below).") == 3
  assert "| step_time | timed out | 150 | `python x.py` |" in text
  assert "| wire | failed (exit 1) | 3 | `python y.py` |" in text
  summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
  assert summary["parts"][0] == {"part": "step_time", "exit_code": 124,
                                 "seconds": 150, "command": "python x.py"}
