"""What every `fmzoo.load` returns: model, params, config, tokenizer side by side."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Loaded:
    model: Any  # the Linen module
    params: Any  # plain pytree of arrays
    config: Any  # the family's config dataclass
    tokenizer: Any = None  # an object with encode(str) -> list[int] and decode(list[int]) -> str
    source: str = ""  # what was loaded: a preset name, a workdir, a Hugging Face directory
    generation: Any = None  # GenerationDefaults; None -> built from the config (greedy, its eos)

    def __post_init__(self):
        if self.generation is None:
            from .generation import GenerationDefaults
            self.generation = GenerationDefaults.for_config(self.config)

    def __iter__(self):  # allows `model, params, config, tokenizer = fmzoo.load(...)`
        return iter((self.model, self.params, self.config, self.tokenizer))
