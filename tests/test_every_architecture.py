""" "all-linear" on every causal-LM architecture the installed transformers ships (tiny, random
weights): lorakit either refuses loudly (ConfigError) or saves exactly PEFT's adapter keys and
shapes, and never leaves a Mixture-of-Experts weight (a 3-D parameter) silently frozen."""

from __future__ import annotations

import pytest
from every_architecture import MODEL_TYPES, Row, run

# Types built on transformers 5.24 at the tiny sizes: 179 of 196 (measured). The floor is 90%
# of that, so a change to the harness (or to transformers) cannot quietly drop most of them.
MIN_BUILT = 161


def lorakit_keys(row: Row) -> dict[str, tuple[int, ...]]:
    """The keys and shapes lorakit saves for the adapter (the mutation point of this test)."""
    assert row.lorakit_keys is not None
    return row.lorakit_keys


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_linear_refuses_or_adapts_what_peft_adapts(model_type: str) -> None:
    row = run(model_type)
    if not row.built:
        return  # counted by test_most_architectures_build; the table names the reason
    if row.crash:
        pytest.fail(f"lorakit crashed instead of refusing:\n{row.crash}")
    if row.refused:
        assert row.refused.startswith("ConfigError: ") and len(row.refused) > 20
        return
    if row.peft_error:
        pytest.fail(f"PEFT refuses this model ({row.peft_error}); lorakit adapted it")
    ours, theirs = lorakit_keys(row), row.peft_keys
    assert set(ours) == set(theirs), (
        f"only lorakit: {sorted(set(ours) - set(theirs))[:5]}; "
        f"only PEFT: {sorted(set(theirs) - set(ours))[:5]}"
    )
    assert ours == theirs, {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    frozen = [
        name
        for name in row.expert_params
        if not any(f".{name.rsplit('.', 1)[0]}." in key for key in ours)
    ]
    assert not frozen, f"3-D (expert) parameters lorakit left frozen: {frozen}"


def test_most_architectures_build() -> None:
    rows = [run(t) for t in MODEL_TYPES]
    not_built = {r.model_type: r.reason for r in rows if not r.built}
    assert len(rows) - len(not_built) >= MIN_BUILT, not_built
