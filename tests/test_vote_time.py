"""The vote step-time benchmark: its rows, its table and its command line."""

import json
import subprocess
import sys

from optax_sign.bench import vote_time


def test_measure_times_every_transport_tie_and_collective():
  rows = vote_time.measure(dim=4096, workers=4, repeats=2)
  names = (["fp32 pmean", "copy floor"]
           + [f"vote {t} ({tie})" for tie in vote_time.TIES
              for t in vote_time.TRANSPORTS]
           + [f"collective {t} ({tie})" for tie in vote_time.TIES
              for t in vote_time.TRANSPORTS[:3]])
  assert sorted(rows) == sorted(names)
  assert rows["fp32 pmean"]["x_pmean"] == 1.0
  for name, row in rows.items():
    assert 0 < row["min_ms"] <= row["ms"], name
    assert row["x_pmean"] > 0, name
  assert rows["vote alltoall (zero)"]["tie"] == "zero"
  assert rows["collective psum (positive)"]["transport"] == "psum"
  table = vote_time.format_table(rows)
  assert "vote auto (positive)" in table and "x pmean" in table


def test_command_line_returns_a_json_ready_dict():
  code = ("import json; from optax_sign.bench import vote_time; "
          "r = vote_time.main(['--dim', '2048', '--workers', '2', "
          "'--repeats', '1']); print('JSON' + json.dumps(r))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "vote step, d=2,048 float32, N=2 simulated" in result.stdout
  [line] = [s for s in result.stdout.splitlines() if s.startswith("JSON")]
  summary = json.loads(line[4:])
  assert (summary["dim"], summary["workers"], summary["backend"]) == (
      2048, 2, "cpu")
  assert summary["auto"] == {"positive": "psum", "zero": "psum"}
  assert "vote alltoall (zero)" in summary["rows"]
