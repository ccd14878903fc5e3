"""Naming modules of a base model, one rule for every place that picks modules by name."""

from __future__ import annotations

from collections.abc import Iterable


def name_matches(name: str, keys: str | Iterable[str]) -> bool:
    """Whether module `name` is one of `keys`, given in full or as a trailing dotted part:
    "lm_head" matches "lm_head" and "model.lm_head", never "foo_lm_head"."""
    keys = (keys,) if isinstance(keys, str) else keys
    return any(name == k or name.endswith("." + k) for k in keys)
