"""Generation defaults a checkpoint carries: EOS ids and sampling settings.

Hugging Face keeps them in generation_config.json (falling back on config.json for the token
ids); transformers' `GenerationConfig` semantics apply: `eos_token_id` is an int or a list
(any id in it ends a sequence), generation_config.json wins over config.json, and
`do_sample: false` means greedy whatever `temperature` says.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# transformers' GenerationConfig defaults, used when a checkpoint names no value
_HF_TEMPERATURE, _HF_TOP_K, _HF_TOP_P = 1.0, 50, 1.0


class GenerationConfigError(ValueError):
    """A generation_config.json / config.json value that cannot be used."""


def _eos_list(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                            for i in items):
        raise GenerationConfigError(f"{where}: eos_token_id must be a non-negative int or a "
                                    f"non-empty list of them; got {value!r}")
    return tuple(dict.fromkeys(int(i) for i in items))  # order kept, duplicates dropped


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What `fmzoo generate` / `fmzoo.infer.generate` use when the caller names nothing.

    temperature 0.0 means greedy (fmzoo's convention); `do_sample` says the same in
    transformers' terms and is kept so that an export writes back what was read.
    """

    eos_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", _eos_list(list(self.eos_ids) or None,
                                                      "GenerationDefaults"))
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise GenerationConfigError(
                f"generation defaults out of range: temperature={self.temperature} (>= 0), "
                f"top_k={self.top_k} (>= 0), top_p={self.top_p} (in (0, 1])")
        if self.repetition_penalty <= 0:
            raise GenerationConfigError(f"repetition_penalty must be > 0; got "
                                        f"{self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise GenerationConfigError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")

    @property
    def eos_id(self) -> int | list[int] | None:
        """The value to pass as `generate(eos_id=...)`: None, one id, or the whole list."""
        if not self.eos_ids:
            return None
        return self.eos_ids[0] if len(self.eos_ids) == 1 else list(self.eos_ids)

    @classmethod
    def from_hf(cls, config_json: dict, generation_config_json: dict | None = None,
                where: str = "generation_config.json") -> "GenerationDefaults":
        gen = dict(generation_config_json or {})
        eos = gen.get("eos_token_id")
        if eos is None:
            eos = config_json.get("eos_token_id")
        eos_ids = _eos_list(eos, where)
        # without generation_config.json transformers samples only when config.json asks
        do_sample = bool(gen.get("do_sample", config_json.get("do_sample", False)))
        top_k = gen.get("top_k", _HF_TOP_K)
        top_p = gen.get("top_p", _HF_TOP_P)
        temperature = gen.get("temperature", _HF_TEMPERATURE)
        for name, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise GenerationConfigError(f"{where}: {name} must be a number; got {v!r}")
        if not do_sample:  # greedy: transformers ignores temperature/top-k/top-p then
            temperature, top_k, top_p = 0.0, 0, 1.0
        else:
            temperature = _HF_TEMPERATURE if temperature is None else float(temperature)
            top_k = 0 if top_k is None else int(top_k)
            top_p = 1.0 if top_p is None else float(top_p)
        rep = gen.get("repetition_penalty")
        mnt = gen.get("max_new_tokens")
        return cls(eos_ids=eos_ids, temperature=temperature, top_k=top_k, top_p=top_p,
                   do_sample=do_sample,
                   repetition_penalty=1.0 if rep is None else float(rep),
                   max_new_tokens=None if mnt is None else int(mnt))

    @classmethod
    def for_config(cls, config: Any) -> "GenerationDefaults":
        """Presets and workdirs: the config's one EOS id, greedy."""
        eos = getattr(config, "eos_id", None)
        return cls(eos_ids=() if eos is None else (int(eos),))

    def to_hf(self) -> dict:
        """generation_config.json contents (transformers' keys) for an export."""
        out: dict[str, Any] = {"do_sample": self.do_sample}
        if self.eos_ids:
            out["eos_token_id"] = self.eos_id
        if self.do_sample:
            out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out
