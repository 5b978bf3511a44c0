"""Training recipes: the peak learning rate, warm-up and schedule each preset trains with
when the user gives none (`fmzoo train` fills --lr / --warmup / --schedule from here;
`fmzoo models` shows them). Found by measurement where a 'why' says so (bench/RESULTS.md,
"Per-preset training recipes").

Why the post-LN encoder-decoder gets a third of the pre-LN LMs' peak learning rate and a
warm-up: in a post-LN transformer the expected gradient of the parameters near the output is
large at initialisation, and does not shrink with depth (Xiong et al. 2020, "On Layer
Normalization in the Transformer Architecture"); Adam's first steps at a high lr then throw
those layers far off and training does not recover (at 3e-3 / 100 warm-up the zoo's
transformer-seq2seq stays at ln 26 on reversal). Warm-up keeps the early steps small until
the second-moment estimates and the weights settle, and the lower peak keeps the later ones
inside what the top layers tolerate; pre-LN's gradients are well-scaled from the start, so
the LMs take 3e-3 with a short warm-up. The measured trade-off (bench/RESULTS.md): 2e-3 with
400 warm-up steps ends lower on a 600-step run, but spends 400 of them ramping, which a short
run cannot afford; 1e-3 / 100 learns from the first hundred steps and still beats the RNN
with attention on the README's 600-step command.

    recipe_for("transformer-seq2seq")  -> {'lr': ..., 'warmup': ..., 'schedule': ..., 'why': ...}
    recipe_for(config)                 -> the family's default for a config
    recipe_for("runs/x")               -> a workdir's stored recipe, else its family's default
"""

from __future__ import annotations

import json
import os
from typing import Any

from .config import EncDecConfig, LMConfig, ModelConfig, RNNConfig

FIELDS = ("lr", "warmup", "schedule")


def _r(lr: float, warmup: int, schedule: str, why: str) -> dict:
    return {"lr": lr, "warmup": warmup, "schedule": schedule, "why": why}


_SMALL_LM = _r(3e-3, 100, "cosine", "pre-LN LM: a high peak with a short warm-up is stable "
               "(measured on gpt-tiny/llama-tiny, bench/RESULTS.md)")
_LARGE_LM = _r(6e-4, 200, "cosine", "GPT-2/3-sized pre-LN LM: the GPT-3 paper's peak for "
               "~100M-1B models (not measured here)")
_POST_LN = _r(1e-3, 100, "cosine", "post-LN encoder-decoder: a third of the LMs' peak "
              "(Xiong et al. 2020: large gradients at the top layers at init; measured, "
              "bench/RESULTS.md)")
_PRE_LN_ENCDEC = _r(2e-3, 100, "cosine", "pre-LN encoder-decoder: well-scaled gradients, "
                    "a shorter warm-up (not swept)")
_RNN = _r(3e-3, 100, "cosine", "GRU encoder-decoder: the zoo's default, measured on "
          "algorithmic/reverse (bench/RESULTS.md)")

RECIPES: dict[str, dict] = {
    "rnn-seq2seq": _RNN,
    "rnn-seq2seq-attn": _RNN,
    "transformer-seq2seq": _POST_LN,
    "transformer-base": _r(7e-4, 4000, "rsqrt", "the Transformer paper's schedule: "
                           "512^-0.5 * min(n^-0.5, n * 4000^-1.5), peak 7.0e-4 at step 4000"),
    "gpt-tiny": _SMALL_LM,
    "gpt2-124m": _LARGE_LM,
    "gpt2-355m": _LARGE_LM,
    "llama-tiny": _SMALL_LM,
    "llama-3.2-1b": _LARGE_LM,
}


def family_recipe(config: ModelConfig) -> dict:
    """The default for a config no preset names (a workdir or HF directory)."""
    if isinstance(config, LMConfig):
        return dict(_SMALL_LM if config.d_model <= 256 else _LARGE_LM)
    if isinstance(config, EncDecConfig):
        return dict(_PRE_LN_ENCDEC if config.pre_ln else _POST_LN)
    if isinstance(config, RNNConfig):
        return dict(_RNN)
    if getattr(config, "family", None) == "actor_critic":  # PPO: trains like its policy
        return family_recipe(config.policy)
    raise TypeError(f"no training recipe for a config of type {type(config).__name__}")


def stored_recipe(workdir: str) -> dict | None:
    """The lr / warm-up / schedule a training workdir's run record holds, if all three."""
    from .workdir import RUN_FILE
    try:
        with open(os.path.join(workdir, RUN_FILE)) as f:
            optim = json.load(f).get("settings", {}).get("optim", {})
    except (OSError, ValueError, AttributeError):
        return None
    if all(optim.get(k) is not None for k in FIELDS):
        return {**{k: optim[k] for k in FIELDS},
                "why": f"the recipe {workdir} was trained with (its run record)"}
    return None


def recipe_for(source_or_config: Any, config: ModelConfig | None = None) -> dict:
    """{'lr', 'warmup', 'schedule', 'why'} for a preset name, a training workdir (its stored
    recipe, else its family's), a Hugging Face directory or a model config (the family's
    default). `config` is the loaded config of a directory, if the caller has it."""
    if isinstance(source_or_config, ModelConfig):
        return family_recipe(source_or_config)
    source = str(source_or_config)
    if source in RECIPES:
        return dict(RECIPES[source])
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        stored = stored_recipe(path)
        if stored is not None:
            return stored
        if config is None:
            from .workdir import RUN_FILE
            if os.path.exists(os.path.join(path, RUN_FILE)):
                from .workdir import load_workdir
                config = load_workdir(path).config
            else:
                from .hf import from_hf
                config = from_hf(path).config
        return family_recipe(config)
    from .registry import get_config
    return family_recipe(get_config(source))  # an unknown name raises with the preset list
