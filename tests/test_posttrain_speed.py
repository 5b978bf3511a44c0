"""bench/posttrain_speed.py: one SFT, DPO and GRPO step and one rollout on a tiny preset, its
JSON objects' fields, and that nothing it imports needs tensorflow-datasets or grain."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "posttrain_speed.py")
ABSENT = ("tensorflow_datasets", "grain")  # tensorflow itself: jax probes for it


class _NoDataLibs:
    """A meta-path finder that fails every import of the libraries the GPU image lacks."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{name} is not installed on the GPU image")
        return None


def _load():
    spec = importlib.util.spec_from_file_location("posttrain_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_step_of_each_part_reports_consistent_json(capsys, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_NoDataLibs(), *sys.meta_path])
    for name in list(sys.modules):
        if name.split(".")[0] in ABSENT:
            monkeypatch.delitem(sys.modules, name)
    bench = _load()
    argv = ["--device", "any", "--preset", "gpt-tiny", "--override", "n_layers=1",
            "--batch", "2", "--seq-len", "16", "--pairs", "1", "--prompts", "2",
            "--generations", "2", "--prompt-len", "4", "--max-new-tokens", "4",
            "--steps", "1", "--warmup", "0", "--json"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["part"] for r in rows] == ["sft", "dpo", "grpo", "rollout"]
    for r in rows:
        assert r["bench"] == "posttrain" and r["preset"] == "gpt-tiny"
        assert r["dtype"] == "float32" and r["attention"] in ("xla", "cudnn")
        assert r["compile_s"] > 0 and r["tokens_per_s"] > 0
    sft, dpo, grpo, ro = rows
    assert (sft["rows"], sft["seq_len"]) == (2, 16)
    assert (dpo["rows"], dpo["seq_len"]) == (2, 16)  # one pair = chosen + rejected rows
    assert (grpo["rows"], grpo["seq_len"]) == (4, 8)  # prompts x G rows of prompt + new
    for r in (sft, dpo, grpo):
        assert r["tokens_per_s"] == pytest.approx(r["rows"] * r["seq_len"] * 1e3 /
                                                  r["ms_per_step"])
    # no EOS: every completion runs to max_new_tokens
    assert ro["rows"] == 4 and ro["generated_tokens"] == 4 * 4
    assert ro["tokens_per_s"] == pytest.approx(ro["generated_tokens"] / ro["seconds"])
    assert ro["ms_per_decode_step"] == pytest.approx(1e3 * ro["seconds"] / 4)
    assert "| rollout | 2 x 2 x (4 + 4 new) |" in out  # the table


def test_top_level_imports_need_no_data_libraries():
    """The modules the bench imports, in a fresh interpreter that cannot import tfds/grain."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from test_posttrain_speed import _NoDataLibs, _load\n"
            "sys.meta_path.insert(0, _NoDataLibs())\n"
            "_load()\n"
            "import fmzoo.models.registry, fmzoo.models.attention, fmzoo.train.sft, "
            "fmzoo.train.dpo_losses, fmzoo.train.grpo, fmzoo.train.rollout, "
            "fmzoo.train.step, fmzoo.train.state, fmzoo.train.mesh, fmzoo.train.optim\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {ABSENT!r}]\n"
            "assert not bad, bad\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_sizes_fail_before_any_work(capsys):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--generations", "1"])
    assert "--generations must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
