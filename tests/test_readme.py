"""Every Python code block of the README runs and finishes without error."""

import os
import re
import subprocess
import sys

import pytest

_README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
with open(_README, encoding="utf-8") as f:
  BLOCKS = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
  script = tmp_path / f"block_{index}.py"
  script.write_text(BLOCKS[index])
  result = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "nan" not in result.stdout.lower(), result.stdout
