"""`fmzoo export`: a model (usually a training workdir) as a Hugging Face safetensors dir.

The directory (config.json, model.safetensors, the tokenizer) loads with transformers'
`AutoModelForCausalLM.from_pretrained`. It is written next to --out under a temporary name
and renamed into place once complete, so an interrupted export never leaves a half-written
--out behind.
"""

from __future__ import annotations

import os
import sys

HELP = "export a model (training workdir, preset or HF dir) as a Hugging Face safetensors dir"

EPILOG = """examples:
  fmzoo export --model runs/gpt-tiny --out exported/gpt-tiny
  fmzoo export --model runs/gpt-tiny --out exported/gpt-tiny --force       (replace --out)
  fmzoo export --model runs/llama --out exported/llama --dtype bfloat16
then, in Python: transformers.AutoModelForCausalLM.from_pretrained("exported/gpt-tiny")
decoder-only LMs (GPT-2 and Llama flavours) only; seq2seq models have no such format here"""


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="training workdir (latest checkpoint), preset name or HF checkpoint dir")
    p.add_argument("--out", required=True, help="directory to write (must be absent or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace --out when it already holds files")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: the model's own)")


def check_out(out: str, force: bool) -> str:
    """The absolute --out, or ValueError when it cannot be (re)written."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; pass a directory path")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out {out} already exists and is not empty; pass --force to "
                         "replace it, or choose another directory")
    return out


def export(source: str, out: str, *, force: bool = False, dtype: str | None = None) -> str:
    """Writes `source` as a Hugging Face dir at `out` (atomically); returns the path."""
    import shutil
    import tempfile

    import fmzoo
    from fmzoo.models.config import LMConfig
    from fmzoo.models.hf import to_hf

    out = check_out(out, force)
    loaded = fmzoo.load(source, dtype=dtype)
    if not isinstance(loaded.config, LMConfig):
        raise ValueError(f"{source!r} is a {type(loaded.config).__name__} model; export writes "
                         "decoder-only LMs (GPT-2 and Llama flavours) only")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary dir
        to_hf(loaded.params, loaded.config, tmp, tokenizer=loaded.tokenizer,
              generation=loaded.generation)
        if os.path.exists(out):  # empty, or --force: move the old one aside, then delete it
            old = tmp + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run(args) -> int:
    out = export(args.model, args.out, force=args.force, dtype=args.dtype)
    print(f"wrote {out} (config.json, generation_config.json, model.safetensors); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({out!r})", file=sys.stderr)
    return 0
