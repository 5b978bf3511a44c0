"""Every ```python block of README.md runs as written: in order, each in a fresh Python
process, from one empty working directory (as a reader copying them would)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 3  # training a workdir, loading it, exporting it
    env = {**os.environ, "FMZOO_DATA_DIR": str(tmp_path / "tfds")}
    for i, code in enumerate(blocks):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"README python block {i + 1} failed:\n{code}\n{out.stderr[-3000:]}"
    assert os.path.isfile(tmp_path / "exported" / "gpt-tiny" / "model.safetensors")
