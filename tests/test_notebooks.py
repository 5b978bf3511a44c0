"""The colab notebooks: built from colab/src by colab/make.py, committed with the outputs of a
full run, and executed here top to bottom in a real Jupyter kernel with SMALL = True (the
claims are asserted inside the notebooks). All notebook executions live in this one file, so
that `-n 2 --dist loadfile` runs them one after another on one worker."""

import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def _load_make():
    spec = importlib.util.spec_from_file_location("fmzoo_colab_make", COLAB / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make = _load_make()
SOURCE_URL = make.source_url()
ids = dict(ids=lambda p: p.stem)


def _read(path):
    return nbformat.read(str(path), as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2, NOTEBOOKS
    assert f'\nSource = "{SOURCE_URL}"' in (ROOT / "pyproject.toml").read_text()
    assert make.resolve([]) == sorted((COLAB / "src").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, **ids)
def test_notebook_is_built_from_its_source(path):
    """Nobody edits a .ipynb by hand: rebuilding it from colab/src gives the same cells."""
    src = COLAB / "src" / f"{path.stem}.py"
    assert src.exists(), f"{path.name} has no source {src}; notebooks are built by colab/make.py"
    assert make.cell_signature(_read(path)) == make.cell_signature(make.build_notebook(src)), (
        f"{path.name} is stale: run `python colab/make.py run {path.stem}`")


@pytest.mark.parametrize("path", NOTEBOOKS, **ids)
def test_notebook_layout(path):
    nb = _read(path)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = _code(nb)
    # the install cell comes first, names pyproject's Source, and is the only IPython syntax
    assert code[0].source == make.install_cell_source() and SOURCE_URL in code[0].source
    from IPython.core.inputtransformer2 import TransformerManager
    python = TransformerManager().transform_cell(code[0].source)
    assert f"""run_line_magic('pip', 'install -q "fmzoo @ git+{SOURCE_URL}"')""" in python
    for cell in code[1:]:
        escapes = [line for line in cell.source.splitlines() if line.lstrip().startswith(("!", "%"))]
        assert not escapes, escapes
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[1], "one parameters cell, right after install"
    assert params[0].source.splitlines()[0] == "SMALL = False"


@pytest.mark.parametrize("path", NOTEBOOKS, **ids)
def test_notebook_is_committed_with_outputs(path):
    """Saved from a full run (make.py run): every code cell ran, none failed, plots are shown,
    and the file stays small."""
    code = _code(_read(path))
    assert all(c.execution_count is not None for c in code), "run `python colab/make.py run`"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot saved"
    assert "is installed at" in "".join(o.get("text", "") for o in code[0].outputs)
    assert path.stat().st_size < 600_000, f"{path.name}: {path.stat().st_size} bytes"


def test_make_rejects_malformed_sources(tmp_path):
    def error(text):
        src = tmp_path / "99_bad.py"
        src.write_text(text)
        with pytest.raises(make.NotebookError) as e:
            make.parse(src)
        return str(e.value)

    title = "# %% [markdown]\n# # 9. Title\n\n"
    params = '# %% tags=["parameters"]\nSMALL = False\n\n'
    assert "exactly one" in error(title + "# %%\nx = 1\n")
    assert "exactly one" in error(title + params + params)
    assert "first one 'SMALL = False'" in error(title + '# %% tags=["parameters"]\nN = 3\n')
    assert "plain assignments" in error(title + '# %% tags=["parameters"]\nSMALL = False\nprint(1)\n')
    derived = error(title + '# %% tags=["parameters"]\nSMALL = False\nN = 2 if SMALL else 8\n')
    assert "literal values only" in derived and "N = 2 if SMALL else 8" in derived
    assert "'!' or '%'" in error(title + params + "# %%\n!pip install x\n")
    assert "must start with '# '" in error(title + params + "# %% [markdown]\nnot a comment\n")
    assert "unknown cell header" in error(title + "# %% [md]\n# x\n")
    assert "title markdown" in error(params)
    # a good one: the install cell goes first, ids are stable across builds
    src = tmp_path / "99_good.py"
    src.write_text(title + '# %% tags=["parameters"]\nSMALL = False\nSEEDS = (0, 1)\n\n'
                   + "# %%\nprint(SMALL)\n")
    nb = make.build_notebook(src)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code", "code"]
    assert nb.cells[1].source == make.install_cell_source()
    assert [c.id for c in nb.cells] == [c.id for c in make.build_notebook(src).cells]
    small = make.inject_small(nb)
    assert small.cells[3].source == "SMALL = True"
    assert small.cells[3].metadata.tags == ["injected-parameters"]


def kernel_env(tmp_path):
    """What a Colab CPU runtime looks like: one device (no simulated ones), no display."""
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline",
               FMZOO_DATA_DIR=str(tmp_path / "data"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.parametrize("path", NOTEBOOKS, **ids)
def test_notebook_runs_small(path, tmp_path):
    nb = make.build_notebook(COLAB / "src" / f"{path.stem}.py")
    # a last cell reports which interpreter the kernel ran: the same as pytest's
    nb.cells.append(nbformat.v4.new_code_cell(
        'import sys; print("interpreter:", sys.executable)', id="probe"))
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        done = make.execute(nb, small=True, cwd=work, timeout=300, env=kernel_env(tmp_path))
    except make.NotebookError as e:
        pytest.fail(f"{path.name} failed in SMALL mode:\n{e}", pytrace=False)
    code = _code(done)
    assert code[2].source == "SMALL = True"  # injected right after the parameters cell
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    install_out = "".join(o.get("text", "") for o in code[0].outputs)
    assert install_out.startswith("fmzoo ") and "is installed at" in install_out, install_out
    probe = "".join(o.get("text", "") for o in code[-1].outputs)
    assert probe.strip() == f"interpreter: {sys.executable}", probe
