"""The colab notebooks run top to bottom (code cells in order, in a fresh interpreter)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def notebook_script(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    for block in code:  # shell escapes and magics are for Colab only; none may be needed here
        assert not any(line.lstrip().startswith(("!", "%")) for line in block.splitlines()), block
    return "\n\n".join(code)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", FMZOO_DATA_DIR=str(tmp_path / "data"),
               XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", notebook_script(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
