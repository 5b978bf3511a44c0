"""Builds and runs the colab notebooks from their sources.

Each notebook's source is a percent-format Python file, colab/src/NN_name.py; the committed
colab/NN_name.ipynb is built from it (never edited by hand) and executed in full mode, so the
repository shows its outputs.

    python colab/make.py build [NAMES...]          source -> .ipynb (outputs kept only when
                                                   no code cell changed)
    python colab/make.py run [NAMES...]            build, execute in a fresh kernel (cwd: an
                                                   empty temp dir), save outputs into colab/
    python colab/make.py run [NAMES...] --small    execute with SMALL = True injected after
                                                   the parameters cell; print times, save nothing
    python colab/make.py check [NAMES...]          exit 1 if a .ipynb is stale or has no source

NAMES: a stem (01_rnn_seq2seq), a prefix (01) or a path; none means all of colab/src.
Percent format: `# %% [markdown]` (lines `# text`, a bare `#` is an empty line), `# %%`, and
one `# %% tags=["parameters"]` cell of plain assignments starting with `SMALL = False`.
make.py inserts the install cell as the first code cell of every notebook.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import os
import pathlib
import re
import sys
import tempfile
import time

import nbformat

COLAB = pathlib.Path(__file__).resolve().parent
SRC = COLAB / "src"
PYPROJECT = COLAB.parent / "pyproject.toml"

INSTALL_MARK = "# fmzoo install cell (written by colab/make.py)"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
_HEADER = re.compile(r"^# %%(?: \[markdown\]| tags=\[\"parameters\"\])?$")


class NotebookError(Exception):
    """A malformed source or a failed execution: the message says what and where."""


def source_url() -> str:
    """pyproject's [project.urls] Source: the one place the install cell's source is named."""
    text = PYPROJECT.read_text()
    try:
        import tomllib
        urls = tomllib.loads(text).get("project", {}).get("urls", {})
    except ImportError:  # Python 3.10: no tomllib; the one line is easy to find
        m = re.search(r'^\[project\.urls\][^\[]*?^Source\s*=\s*"([^"]+)"', text, re.M | re.S)
        urls = {"Source": m.group(1)} if m else {}
    if "Source" not in urls:
        raise NotebookError(f"{PYPROJECT}: [project.urls] has no Source; add "
                            'Source = "https://github.com/OWNER/fmzoo" (the install cell uses it)')
    return urls["Source"]


def install_cell_source() -> str:
    # IPython (>= 7) rewrites a magic inside an indented block like any other line; the pip
    # magic installs into the kernel's own interpreter, which `!pip` does not promise.
    return "\n".join([
        INSTALL_MARK,
        "# On Colab this installs fmzoo; where fmzoo is already importable it does nothing.",
        "import importlib, importlib.metadata, importlib.util",
        'if importlib.util.find_spec("fmzoo") is None:',
        f'    %pip install -q "fmzoo @ git+{source_url()}"',
        "    importlib.invalidate_caches()",
        "else:",
        '    print("fmzoo", importlib.metadata.version("fmzoo"), "is installed at",',
        '          importlib.util.find_spec("fmzoo").submodule_search_locations[0])',
    ])


def _escape_lines(source: str) -> list[str]:
    return [line for line in source.splitlines() if line.lstrip().startswith(("!", "%"))]


def parse(path: pathlib.Path) -> list[dict]:
    """The percent-format file as [{"type": "markdown"|"code", "source": str, "tags": [...]}]."""
    cells, current = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("# %%"):
            if not _HEADER.match(line):
                raise NotebookError(f"{path}:{n}: unknown cell header {line!r}; use '# %%', "
                                    "'# %% [markdown]' or '# %% tags=[\"parameters\"]'")
            kind = "markdown" if line.endswith("[markdown]") else "code"
            tags = [PARAMETERS_TAG] if "parameters" in line else []
            current = {"type": kind, "lines": [], "tags": tags, "line": n}
            cells.append(current)
        elif current is None:
            if line.strip():
                raise NotebookError(f"{path}:{n}: text before the first '# %%' header; start "
                                    "the file with '# %% [markdown]' and the title")
        elif current["type"] == "markdown":
            if line.strip() and line != "#" and not line.startswith("# "):
                raise NotebookError(f"{path}:{n}: a markdown line must start with '# ' (or be "
                                    f"a bare '#'): {line!r}")
            current["lines"].append(line[2:] if line.startswith("# ") else "")
        else:
            current["lines"].append(line)
    for cell in cells:
        cell["source"] = "\n".join(cell.pop("lines")).strip("\n")
    _validate(path, cells)
    return cells


def _validate(path: pathlib.Path, cells: list[dict]) -> None:
    if not cells or cells[0]["type"] != "markdown" or not cells[0]["source"].startswith("# "):
        raise NotebookError(f"{path}: the first cell must be the title markdown ('# # N. ...')")
    for cell in cells:
        if not cell["source"]:
            raise NotebookError(f"{path}:{cell['line']}: empty cell; delete its header")
        if cell["type"] == "code" and _escape_lines(cell["source"]):
            raise NotebookError(f"{path}:{cell['line']}: '!' or '%' lines {_escape_lines(cell['source'])} "
                                "do not run outside IPython; use Python (the install cell is "
                                "the only magic, and make.py writes it)")
    params = [c for c in cells if PARAMETERS_TAG in c["tags"]]
    if len(params) != 1:
        raise NotebookError(f"{path}: found {len(params)} parameters cells; write exactly one "
                            "'# %% tags=[\"parameters\"]' cell right after the title")
    body = ast.parse(params[0]["source"]).body
    if not all(isinstance(s, ast.Assign) for s in body) or not body or \
            ast.unparse(body[0]) != "SMALL = False":
        raise NotebookError(f"{path}:{params[0]['line']}: the parameters cell holds plain "
                            "assignments only, the first one 'SMALL = False'")
    derived = [ast.unparse(s) for s in body if not _is_literal(s.value)]
    if derived:
        # a runner (papermill, execute(small=True)) sets SMALL in a cell *after* this one, so a
        # value computed here from SMALL would silently keep its full-size setting
        raise NotebookError(f"{path}:{params[0]['line']}: the parameters cell holds literal "
                            f"values only; move {derived} to the next cell (SMALL = True is "
                            "injected after this cell, so sizes derived here stay full-size)")
    first_code = next(c for c in cells if c["type"] == "code")
    if first_code is not params[0]:
        raise NotebookError(f"{path}:{params[0]['line']}: the parameters cell must be the first "
                            "code cell (right after the title markdown)")


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _cell_id(source: str, seen: set) -> str:
    # ids derived from content: rebuilding an unchanged source gives the same file
    base = hashlib.sha1(source.encode()).hexdigest()[:8]
    cid, k = base, 1
    while cid in seen:
        cid, k = f"{base}-{k}", k + 1
    seen.add(cid)
    return cid


def build_notebook(src: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook (without outputs) that the percent-format source describes."""
    cells = parse(src)
    first_code = next(i for i, c in enumerate(cells) if c["type"] == "code")
    cells.insert(first_code, {"type": "code", "source": install_cell_source(), "tags": []})
    nb, seen = nbformat.v4.new_notebook(metadata=dict(METADATA)), set()
    for c in cells:
        make = nbformat.v4.new_markdown_cell if c["type"] == "markdown" else nbformat.v4.new_code_cell
        cell = make(c["source"], id=_cell_id(c["source"], seen))
        if c["tags"]:
            cell.metadata["tags"] = list(c["tags"])
        nb.cells.append(cell)
    return nb


def cell_signature(nb) -> list[tuple]:
    """What a source determines about a notebook: the cells' types, sources and tags."""
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", []))) for c in nb.cells]


def resolve(names: list[str]) -> list[pathlib.Path]:
    """Source files for NAMES (stems, prefixes or paths); all sources when NAMES is empty."""
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if not names:
        if not sources:
            raise NotebookError(f"no notebook sources in {SRC}")
        return sources
    out = []
    for name in names:
        stem = pathlib.Path(name).stem
        hits = [s for s in sources if s.stem == stem] or [s for s in sources if s.stem.startswith(stem)]
        if len(hits) != 1:
            known = ", ".join(s.stem for s in sources)
            raise NotebookError(f"{name!r} names {len(hits)} notebook sources; known: {known}")
        out.append(hits[0])
    return out


def target(src: pathlib.Path) -> pathlib.Path:
    return COLAB / f"{src.stem}.ipynb"


def write(nb, path: pathlib.Path) -> None:
    nbformat.validate(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))  # then rename: a failure never leaves half a notebook
    os.replace(tmp, path)


def build(src: pathlib.Path) -> pathlib.Path:
    """Writes colab/NN.ipynb from its source; keeps the saved outputs when no cell changed."""
    nb, path = build_notebook(src), target(src)
    if path.exists():
        old = nbformat.read(str(path), as_version=4)
        if cell_signature(old) == cell_signature(nb):
            return path  # up to date: leave its outputs alone
        if any(c.get("outputs") for c in old.cells):
            print(f"{path.name}: cells changed, saved outputs dropped; "
                  f"`python colab/make.py run {src.stem}` regenerates them")
    write(nb, path)
    return path


# ---------------------------------------------------------------- execution


def _kernel_manager_class():
    """An AsyncKernelManager whose 'python3' kernel is THIS interpreter (sys.executable), not
    whichever `python` comes first on PATH, as an installed kernel.json would have it."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class SameInterpreterSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                              display_name="Python 3", language="python", name=kernel_name)

    class SameInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return SameInterpreterSpecs(data_dir=self.data_dir)

    return SameInterpreterKernelManager


def inject_small(nb) -> nbformat.NotebookNode:
    """A copy of nb with a `SMALL = True` cell right after the parameters cell (papermill's
    convention: tagged 'injected-parameters')."""
    nb = nbformat.from_dict(nb)
    idx = [i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.metadata.get("tags", [])]
    if len(idx) != 1:
        raise NotebookError(f"expected one cell tagged {PARAMETERS_TAG!r}, found {len(idx)}")
    cell = nbformat.v4.new_code_cell("SMALL = True", id="injected-parameters")
    cell.metadata["tags"] = [INJECTED_TAG]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


def kernel_env() -> dict:
    """The caller's environment, with plots drawn inline (an Agg MPLBACKEND would swallow them)."""
    env = dict(os.environ)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def _cell_seconds(cell) -> float:
    t = cell.metadata.get("execution", {})
    try:
        start = datetime.datetime.fromisoformat(t["iopub.status.busy"].replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(t["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return 0.0
    return (end - start).total_seconds()


def execute(nb_or_path, *, small: bool, cwd, timeout: int = 600, env: dict | None = None):
    """Executes a notebook (a NotebookNode or a path) in a fresh kernel running this
    interpreter (sys.executable), with cwd as its working directory and env as its
    environment (default: kernel_env()); SMALL = True injected when small. Returns the
    executed notebook with volatile metadata stripped. Raises NotebookError with the failing
    cell's source and traceback."""
    return execute_timed(nb_or_path, small=small, cwd=cwd, timeout=timeout, env=env)[0]


def execute_timed(nb_or_path, *, small: bool, cwd, timeout: int = 600, env: dict | None = None):
    """execute(), also returning each cell's kernel execution time in seconds."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nb_or_path
    if not isinstance(nb, nbformat.NotebookNode):
        nb = nbformat.read(str(nb), as_version=4)
    nb = inject_small(nb) if small else nbformat.from_dict(nb)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                            kernel_manager_class=_kernel_manager_class(),
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=kernel_env() if env is None else env)
    except (CellExecutionError, CellTimeoutError) as e:
        raise NotebookError(re.sub(r"\x1b\[[0-9;]*m", "", str(e))) from None  # no colours
    seconds = [_cell_seconds(c) if c.cell_type == "code" else 0.0 for c in nb.cells]
    for cell in nb.cells:  # timestamps and the kernel's version churn the diff: drop them
        cell.metadata.pop("execution", None)
    nb.metadata = nbformat.from_dict(dict(METADATA))
    return nb, seconds


def run(src: pathlib.Path, *, small: bool, timeout: int) -> float:
    """Build, execute in an empty temp dir; full mode saves the outputs into colab/."""
    nb = build_notebook(src)
    with tempfile.TemporaryDirectory(prefix=f"fmzoo-{src.stem}-") as cwd:
        t0 = time.perf_counter()
        done, seconds = execute_timed(nb, small=small, cwd=cwd, timeout=timeout)
        wall = time.perf_counter() - t0
    slow = sorted(((s, i) for i, s in enumerate(seconds)), reverse=True)[:3]
    print(f"{src.stem}: {'SMALL' if small else 'full'} mode, kernel execution "
          f"{sum(seconds):.1f} s (wall {wall:.1f} s with kernel start); slowest cells: "
          + ", ".join(f"#{i} {s:.1f} s" for s, i in slow))
    if not small:
        write(done, target(src))
        kb = target(src).stat().st_size / 1024
        print(f"wrote {target(src).relative_to(COLAB.parent)} ({kb:.0f} KB)")
    return sum(seconds)


def stale(srcs: list[pathlib.Path]) -> list[str]:
    problems = []
    for src in srcs:
        path = target(src)
        if not path.exists():
            problems.append(f"{path.name}: missing; run `python colab/make.py run {src.stem}`")
        elif cell_signature(nbformat.read(str(path), as_version=4)) != cell_signature(build_notebook(src)):
            problems.append(f"{path.name}: differs from {src.relative_to(COLAB.parent)}; "
                            f"run `python colab/make.py run {src.stem}`")
    known = {target(s).name for s in sorted(SRC.glob("[0-9][0-9]_*.py"))}
    problems += [f"{p.name}: no source colab/src/{p.stem}.py" for p in sorted(COLAB.glob("*.ipynb"))
                 if p.name not in known]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "run", "check"])
    ap.add_argument("names", nargs="*", help="notebooks (stem, NN prefix or path); default all")
    ap.add_argument("--small", action="store_true", help="run: inject SMALL = True, save nothing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = ap.parse_args(argv)
    try:
        srcs = resolve(args.names)
        if args.command == "build":
            for src in srcs:
                print(build(src).relative_to(COLAB.parent))
        elif args.command == "check":
            problems = stale(srcs)
            print("\n".join(problems) or "all notebooks are up to date with their sources")
            return 1 if problems else 0
        else:
            failed = []
            for src in srcs:
                try:
                    run(src, small=args.small, timeout=args.timeout)
                except NotebookError as e:
                    print(f"{src.stem} FAILED (colab/{src.stem}.ipynb left untouched):\n{e}",
                          file=sys.stderr)
                    failed.append(src.stem)
            if failed:
                print("failed: " + ", ".join(failed), file=sys.stderr)
                return 1
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
