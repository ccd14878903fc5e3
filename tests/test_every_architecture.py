""" "all-linear" on every causal-LM architecture the installed transformers ships (tiny, random
weights): lorakit either refuses loudly (ConfigError) or saves exactly PEFT's adapter keys and
shapes, and never leaves a Mixture-of-Experts weight (a 3-D parameter) silently frozen.
With explicit targets (one attention projection and the leaf names of the fused 3-D expert
weights transformers describes, `is_transposed`), PEFT's random adapter copied into lorakit gives
PEFT's keys, shapes, logits and gradients on every such architecture that runs a forward."""

from __future__ import annotations

import pytest
from every_architecture import (
    EXPERT_TYPES,
    MODEL_TYPES,
    Row,
    build,
    described_experts,
    explicit_status,
    run,
    run_explicit,
)

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


# Of the EXPERT_TYPES, those whose tiny base model runs a forward on transformers 5.24: 52 of 53
# (measured; dots3_note_text's tiny config does not run). The floor is 90% of that.
MIN_EXPERTS_RUN = 47


def test_expert_types_are_those_built_with_described_experts() -> None:
    """EXPERT_TYPES (the parametrization below) is every built type with `is_transposed` experts."""
    found = [t for t in MODEL_TYPES if not isinstance(m := build(t), str) and described_experts(m)]
    assert found == EXPERT_TYPES


@pytest.mark.parametrize("model_type", EXPERT_TYPES)
def test_explicit_expert_targets_equal_peft(model_type: str) -> None:
    row = run_explicit(model_type)
    if row.not_run:
        return  # counted by test_most_expert_architectures_run; the table names the reason
    if row.peft_error:
        pytest.skip(f"PEFT refuses: {row.peft_error}")
    assert not row.crash, f"lorakit raised where PEFT adapts ({row.experts_class}):\n{row.crash}"
    ours, theirs = row.lorakit_shapes, row.peft_shapes
    assert set(ours) == set(theirs), (
        f"only lorakit: {sorted(set(ours) - set(theirs))[:5]}; "
        f"only PEFT: {sorted(set(theirs) - set(ours))[:5]}"
    )
    assert ours == theirs, {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    adapted = {m for m in row.expert_modules if any(f".model.{m}." in k for k in ours)}
    assert adapted == set(row.expert_modules), "experts modules left unadapted"
    assert row.base_diff > 1e-4, "the adapter does not change the logits"
    assert row.logit_diff <= 1e-4, f"max |lorakit - PEFT| logit: {row.logit_diff:.3g}"
    assert not row.grad_mismatch, f"gradients differ from PEFT's: {row.grad_mismatch[:5]}"
    assert explicit_status(row) == "same as PEFT"


def test_most_expert_architectures_run() -> None:
    rows = [run_explicit(t) for t in EXPERT_TYPES]
    not_run = {r.model_type: r.not_run for r in rows if r.not_run}
    assert len(rows) - len(not_run) >= MIN_EXPERTS_RUN, not_run
