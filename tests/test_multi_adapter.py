"""Many adapters on one base, against PEFT (the oracle) and float64 closed forms: save/load
layouts both ways, active-adapter switching, weighted combinations, mixed-adapter batches."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import VOCAB, make_tiny_gpt2, make_tiny_llama
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.lora.files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.lora import decode_kernel
from lorakit.lora import mixed as mixed_mod
from lorakit.lora.layer import LoraLayer

TOL = 1e-5
KINDS = ["llama", "gpt2"]


def make_base(kind: str, **kw):
    return make_tiny_gpt2(**kw) if kind == "gpt2" else make_tiny_llama(**kw)


def attn_name(kind: str) -> str:
    return "c_attn" if kind == "gpt2" else "q_proj"


def configs(kind: str) -> dict[str, dict]:
    """Three adapters that differ in rank, alpha, scaling rule and targets."""
    return {
        "default": dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"),
        "second": dict(r=2, lora_alpha=3, init_lora_weights=False,
                       target_modules=[attn_name(kind)]),
        "third": dict(r=4, lora_alpha=6, init_lora_weights=False, use_rslora=True,
                      target_modules="all-linear"),
    }


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every adapter tensor away from its start (all adapters, active or not)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "magnitude" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def ours_with_three(kind: str) -> LoraModel:
    cfgs = configs(kind)
    model = get_lora_model(make_base(kind), LoraConfig(**cfgs.pop("default")))
    for name, kw in cfgs.items():
        model.add_adapter(name, LoraConfig(**kw))
    perturb(model)
    return model


def files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- save / load layouts -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_every_adapter_we_save(kind, input_ids, tmp_path):
    ours = ours_with_three(kind)
    ours.save_pretrained(tmp_path)
    assert files(tmp_path) == {CONFIG_NAME, WEIGHTS_NAME, f"second/{CONFIG_NAME}",
                               f"second/{WEIGHTS_NAME}", f"third/{CONFIG_NAME}",
                               f"third/{WEIGHTS_NAME}"}
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path)
    theirs.load_adapter(tmp_path / "second", "second")
    theirs.load_adapter(tmp_path / "third", "third")
    for name in ["default", "second", "third"]:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, input_ids), logits(ours, input_ids),
                                   atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_same_layout_and_keys_as_peft(kind, tmp_path):
    cfgs = configs(kind)
    theirs = peft.get_peft_model(make_base(kind), peft.LoraConfig(**cfgs.pop("default")))
    for name, kw in cfgs.items():
        theirs.add_adapter(name, peft.LoraConfig(**kw))
    theirs.save_pretrained(tmp_path / "peft")
    ours_with_three(kind).save_pretrained(tmp_path / "ours")
    assert files(tmp_path / "ours") == files(tmp_path / "peft") - {"README.md"}  # model card
    for sub in ["", "second", "third"]:
        ours_keys = set(load_file(tmp_path / "ours" / sub / WEIGHTS_NAME))
        assert ours_keys == set(load_file(tmp_path / "peft" / sub / WEIGHTS_NAME))


@pytest.mark.parametrize("kind", KINDS)
def test_we_load_a_multi_adapter_directory_saved_by_peft(kind, input_ids, tmp_path):
    cfgs = configs(kind)
    theirs = peft.get_peft_model(make_base(kind), peft.LoraConfig(**cfgs.pop("default")))
    for name, kw in cfgs.items():
        theirs.add_adapter(name, peft.LoraConfig(**kw))
    perturb(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make_base(kind), tmp_path)
    ours.load_adapter(tmp_path / "second", "second")
    ours.load_adapter(tmp_path / "third", "third")
    assert ours.list_adapters() == ["default", "second", "third"]
    for name in ["default", "second", "third"]:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids),
                                   atol=TOL, rtol=0)


def test_selected_adapters_and_unknown_names(tmp_path):
    model = ours_with_three("llama")
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    assert files(tmp_path) == {f"second/{CONFIG_NAME}", f"second/{WEIGHTS_NAME}"}
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


# -- active adapters -----------------------------------------------------------------------------
def test_active_adapters_train_and_others_are_frozen():
    model = ours_with_three("llama")
    assert model.active_adapters == ["default"] and model.list_adapters() == ["default", "second",
                                                                              "third"]

    def trainable_adapters() -> set[str]:
        return {n.split(".adapters.")[1].split(".")[0]
                for n, p in model.model.named_parameters() if p.requires_grad}

    assert trainable_adapters() == {"default"}
    model.set_adapter(["second", "third"])
    assert model.active_adapters == ["second", "third"]
    assert trainable_adapters() == {"second", "third"}
    assert not any(p.requires_grad for n, p in model.model.named_parameters()
                   if ".adapters." not in n)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")


@pytest.mark.parametrize("kind", KINDS)
def test_several_active_adapters_add_up_like_peft(kind, input_ids, tmp_path):
    ours = ours_with_three(kind)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path)
    theirs.load_adapter(tmp_path / "second", "second")
    theirs.load_adapter(tmp_path / "third", "third")
    ours.set_adapter(["default", "third", "second"])
    theirs.base_model.set_adapter(["default", "third", "second"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=TOL, rtol=0)


def test_delete_adapter(input_ids, tmp_path):
    model = ours_with_three("llama")
    model.set_adapter("second")
    model.delete_adapter("second")
    assert model.list_adapters() == ["default", "third"]
    assert model.active_adapters == ["default"]  # falls back to the first remaining adapter
    assert not any("second" in n for n, _ in model.model.named_parameters())
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "second").exists()
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("second")
    # deleting a merged adapter unmerges it first: the base weights come back
    model.set_adapter("third")
    model.merge_adapter()
    model.delete_adapter("third")
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), logits(make_tiny_llama(), input_ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "lora_A", "x.y", "", "__base__", "a b",
                                  "base_layer", "-x"])
def test_adapter_names_are_validated_before_anything_is_written(name, tmp_path):
    model = get_lora_model(make_tiny_llama(), LoraConfig())
    model.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, LoraConfig())
    with pytest.raises(ValueError, match="adapter name"):
        model.load_adapter(tmp_path / "good", name)
    assert model.list_adapters() == ["default"]
    assert [n for n, _ in model.model.named_modules() if n.endswith(".adapters." + name)] == []


# -- weighted combinations -------------------------------------------------------------------------
def delta(adapter) -> torch.Tensor:
    """s·B·A in float64, straight from the adapter's tensors."""
    return adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()


WEIGHTS = [0.7, -1.3, 2.0]


def peft_twin(ours: LoraModel, kind: str, tmp_path) -> peft.PeftModel:
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path)
    for name in ours.list_adapters()[1:]:
        theirs.load_adapter(tmp_path / name, name)
    return theirs


@pytest.mark.parametrize("kind", KINDS)
def test_cat_combination_is_the_exact_weighted_sum(kind, input_ids, tmp_path):
    ours = ours_with_three(kind)
    names = ["default", "second", "third"]
    ours.add_weighted_adapter(names, WEIGHTS, "mix", combination_type="cat")
    assert ours.peft_config["mix"].r == 4 + 2 + 4
    for _, layer in ours.model.named_modules():
        if isinstance(layer, LoraLayer):
            expected = sum(w * delta(layer.adapters[n]) for n, w in zip(names, WEIGHTS)
                           if n in layer.adapters)
            torch.testing.assert_close(delta(layer.adapters["mix"]), expected, atol=1e-6, rtol=0)
    theirs = peft_twin(ours, kind, tmp_path / "src")
    theirs.add_weighted_adapter(names, WEIGHTS, "mix", combination_type="cat")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=TOL, rtol=0)
    # and the combination is an ordinary adapter: saved, PEFT reads it
    ours.save_pretrained(tmp_path / "mix", selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(make_base(kind), tmp_path / "mix" / "mix")
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("svd_rank", [None, 3])
def test_svd_combination_is_the_best_rank_k_approximation(kind, svd_rank, input_ids, tmp_path):
    ours = ours_with_three(kind)
    names = ["default", "second", "third"]
    ours.add_weighted_adapter(names, WEIGHTS, "mix", combination_type="svd", svd_rank=svd_rank)
    k = svd_rank or 4
    assert ours.peft_config["mix"].r == k
    for _, layer in ours.model.named_modules():
        if isinstance(layer, LoraLayer):
            target = sum(w * delta(layer.adapters[n]) for n, w in zip(names, WEIGHTS)
                         if n in layer.adapters)
            s = torch.linalg.svdvals(target)
            err = torch.linalg.matrix_norm(delta(layer.adapters["mix"]) - target)
            # Eckart–Young: the error of the best rank-k approximation is the tail's norm
            torch.testing.assert_close(err, s[k:].norm(), atol=1e-5, rtol=1e-4)
    theirs = peft_twin(ours, kind, tmp_path)
    theirs.add_weighted_adapter(names, WEIGHTS, "mix", combination_type="svd", svd_rank=svd_rank)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_combination_follows_peft(kind, input_ids, tmp_path):
    ours = ours_with_three(kind)
    names, weights = ["default", "third"], [0.7, -1.3]  # "linear" needs equal ranks
    ours.add_weighted_adapter(names, weights, "mix", combination_type="linear")
    for _, layer in ours.model.named_modules():
        if isinstance(layer, LoraLayer):
            # PEFT's definition: √|w·s| on each side, the sign on A
            ads = [(layer.adapters[n], w) for n, w in zip(names, weights)]
            a = sum(torch.sign(torch.tensor(w * ad.scaling)) * abs(w * ad.scaling) ** 0.5
                    * ad.lora_A.double() for ad, w in ads)
            b = sum(abs(w * ad.scaling) ** 0.5 * ad.lora_B.double() for ad, w in ads)
            torch.testing.assert_close(delta(layer.adapters["mix"]), b @ a, atol=1e-6, rtol=0)
    theirs = peft_twin(ours, kind, tmp_path)
    theirs.add_weighted_adapter(names, weights, "mix", combination_type="linear")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=TOL, rtol=0)


def test_single_adapter_combination_scales_it(input_ids):
    ours = ours_with_three("llama")
    for kind in ["cat", "svd", "linear"]:
        ours.add_weighted_adapter(["default"], [0.5], f"half_{kind}", combination_type=kind)
        layer = ours.model.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(delta(layer.adapters[f"half_{kind}"]),
                                   0.5 * delta(layer.adapters["default"]), atol=1e-6, rtol=0)


def test_weighted_adapter_errors():
    model = ours_with_three("llama")
    model.add_adapter("dora", LoraConfig(use_dora=True, init_lora_weights=False))
    with pytest.raises(ValueError, match="equal rank"):
        model.add_weighted_adapter(["default", "second"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="DoRA"):
        model.add_weighted_adapter(["default", "dora"], [1, 1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default", "third"], [1, 1], "second")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "third"], [1], "x")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "third"], [1, 1], "x", combination_type="ties")
    assert "x" not in model.list_adapters()


# -- mixed-adapter batches -----------------------------------------------------------------------
def mixed_model(kind: str) -> LoraModel:
    model = ours_with_three(kind)
    model.add_adapter("dora", LoraConfig(r=3, lora_alpha=5, use_dora=True, init_lora_weights=False))
    perturb(model, seed=11)
    return model.eval()


def single(model: LoraModel, name: str, fn):
    if name == "__base__":
        with model.disable_adapters():
            return fn()
    model.set_adapter(name)
    return fn()


ROWS = ["third", "default", "__base__", "dora", "second", "default"]
# rows grouped by adapter: prefills take the per-adapter (segmented) path
GROUPED = ["third", "third", "default", "default", "__base__", "dora", "second"]


def batch(n: int = len(ROWS), seq: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


@pytest.fixture(params=["kernel", "torch"])
def update_path(request, monkeypatch):
    """Mixed-batch updates by the compiled kernel (where it applies) or by torch alone."""
    if request.param == "torch":
        monkeypatch.setenv(decode_kernel.ENV, "0")
    return request.param


@pytest.mark.parametrize("rows", [ROWS, GROUPED], ids=["interleaved", "grouped"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows_equal_single_adapter_runs(kind, rows, update_path):
    model = mixed_model(kind)
    ids = batch(len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        expected = single(model, name, lambda: logits(model, ids[i:i + 1]))
        torch.testing.assert_close(mixed[i:i + 1], expected, atol=TOL, rtol=0)
    # the context leaves nothing behind
    assert all(m.mixed is None for m in model.model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_logits_equal_peft_mixed_batch(kind, tmp_path):
    model = ours_with_three(kind).eval()
    theirs = peft_twin(model, kind, tmp_path).eval()
    rows = ["second", "__base__", "default", "third", "third"]
    ids = batch(len(rows))
    torch.testing.assert_close(logits(model, ids, adapter_names=rows),
                               logits(theirs, ids, adapter_names=rows), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_generation_keeps_each_rows_adapter(kind, tmp_path, update_path):
    model = ours_with_three(kind).eval()
    theirs = peft_twin(model, kind, tmp_path).eval()
    rows = ["second", "__base__", "default", "third"]
    ids = batch(len(rows), seq=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, adapter_names=rows, **kw)
    assert out.shape == (len(rows), 5 + 8)
    for i, name in enumerate(rows):
        expected = single(model, name, lambda: model.generate(input_ids=ids[i:i + 1], **kw))
        torch.testing.assert_close(out[i:i + 1], expected, atol=0, rtol=0)
    torch.testing.assert_close(out, theirs.generate(input_ids=ids, adapter_names=rows, **kw),
                               atol=0, rtol=0)
    # beams repeat rows inside generate; each repeated row keeps its adapter
    beams = model.generate(input_ids=ids, adapter_names=rows, num_beams=2,
                           num_return_sequences=2, **kw)
    for i, name in enumerate(rows):
        expected = single(model, name, lambda: model.generate(
            input_ids=ids[i:i + 1], num_beams=2, num_return_sequences=2, **kw))
        torch.testing.assert_close(beams[2 * i:2 * i + 2], expected, atol=0, rtol=0)


def test_mixed_batch_is_one_grouped_computation_per_layer(monkeypatch):
    """Adapters are stacked once per call (not per step or per row), and each layer's adapter
    work is two GEMMs shared by all rows (no per-row gather of A and B), whatever the number of
    rows and adapters."""
    model = mixed_model("llama")
    built = []
    original = mixed_mod.MixedUpdate.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)
    monkeypatch.setattr(mixed_mod.MixedUpdate, "__init__", counting)
    n_layers = sum(isinstance(m, LoraLayer) for m in model.model.modules())
    model.generate(input_ids=batch(), adapter_names=ROWS, max_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    assert len(built) == n_layers  # once per layer for the whole generation

    calls = {"bmm": 0, "baddbmm": 0, "matmul": 0}
    real = {k: getattr(torch, k) for k in calls}
    for k in real:
        monkeypatch.setattr(torch, k, lambda *a, _k=k, **kw: (calls.__setitem__(_k, calls[_k] + 1),
                                                               real[_k](*a, **kw))[1])
    logits(model, batch(), adapter_names=ROWS)
    assert calls == {"bmm": 0, "baddbmm": 0, "matmul": n_layers}


def kept(model: LoraModel, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """Logits of a mixed batch whose layers keep their stacked adapters (as the engine's)."""
    with torch.no_grad(), model.mixed_adapter_batch(rows, len(rows), keep_slots=True):
        return model(input_ids=ids).logits


def test_kept_slots_follow_adapters_added_and_deleted():
    """With keep_slots each layer stacks its adapters once and keeps them between batches; an
    adapter added or deleted since is what the next batch sees. Without keep_slots a batch sees
    adapter weights changed in place (as between training steps); with them, once the slots are
    cleared."""
    model = mixed_model("llama")
    layers = [m for m in model.model.modules() if isinstance(m, LoraLayer)]
    rows = ["default", "__base__", "third"]
    ids = batch(len(rows))
    first = kept(model, ids, rows)
    assert all(m.slot is not None for m in layers)
    torch.testing.assert_close(kept(model, ids, rows), first, atol=0, rtol=0)
    model.add_adapter("late", LoraConfig(r=5, lora_alpha=7, init_lora_weights=False))
    late = ["late", "default", "late"]
    mixed = kept(model, ids, late)
    model.delete_adapter("third")
    torch.testing.assert_close(kept(model, ids, late), mixed, atol=TOL, rtol=0)
    for i, name in enumerate(late):
        expected = single(model, name, lambda: logits(model, ids[i:i + 1]))
        torch.testing.assert_close(mixed[i:i + 1], expected, atol=TOL, rtol=0)
    before = logits(model, ids, adapter_names=late)
    perturb(model, seed=12)
    after = logits(model, ids, adapter_names=late)
    assert not torch.allclose(before, after)
    for i, name in enumerate(late):
        expected = single(model, name, lambda: logits(model, ids[i:i + 1]))
        torch.testing.assert_close(after[i:i + 1], expected, atol=TOL, rtol=0)
    # kept slots see weights changed in place once they are cleared
    model.clear_adapter_slots()
    torch.testing.assert_close(kept(model, ids, late), after, atol=TOL, rtol=0)


def test_modules_to_save_copies_follow_each_row():
    model = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False,
                                                         modules_to_save=["lm_head"]))
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".copies." in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    rows = ["other", "default", "__base__", "default"]
    ids = batch(len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i:i + 1],
                                   single(model, name, lambda: logits(model, ids[i:i + 1])),
                                   atol=TOL, rtol=0)


def test_mixed_batch_on_bf16_base():
    model = get_lora_model(make_tiny_llama().to(torch.bfloat16),
                           LoraConfig(init_lora_weights=False))
    model.add_adapter("dora", LoraConfig(r=2, use_dora=True, init_lora_weights=False))
    model.eval()
    rows = ["dora", "__base__", "default"]
    ids = batch(len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    assert mixed.dtype == torch.bfloat16
    for i, name in enumerate(rows):
        expected = single(model, name, lambda: logits(model, ids[i:i + 1]))
        torch.testing.assert_close(mixed[i:i + 1].float(), expected.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("work", [0, 10**9], ids=["update-in-bf16", "update-in-fp32"])
@pytest.mark.parametrize("rows", [["third", "__base__", "default", "default"], ["third"] * 3])
def test_mixed_batch_on_bf16_base_in_either_precision(work, rows, monkeypatch):
    """Small updates on a bf16 base are computed in fp32, large ones in bf16
    (LOW_PRECISION_WORK); both give each row its own adapter, and a batch of one adapter (whose
    row mask is skipped) equals that adapter alone. (Torch's path, used without the compiled
    kernel; the kernel is tested in test_decode_kernel.py.)"""
    monkeypatch.setattr(mixed_mod, "LOW_PRECISION_WORK", work)
    monkeypatch.setenv(decode_kernel.ENV, "0")
    lowered = []
    in_dtype = mixed_mod.AdapterStack.in_dtype
    monkeypatch.setattr(mixed_mod.AdapterStack, "in_dtype",
                        lambda self, dtype: lowered.append(dtype) or in_dtype(self, dtype))
    model = LoraModel(make_tiny_llama().to(torch.bfloat16), None)
    for name, cfg in configs("llama").items():
        model.add_adapter(name, LoraConfig(**cfg))
    perturb(model, seed=5)
    model.eval()
    ids = batch(len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    assert (torch.bfloat16 in lowered) == (work == 0)
    for i, name in enumerate(rows):
        expected = single(model, name, lambda: logits(model, ids[i:i + 1]))
        torch.testing.assert_close(mixed[i:i + 1].float(), expected.float(), atol=0.05, rtol=0.02)


def test_mixed_batch_errors():
    model = mixed_model("llama")
    ids = batch(3)
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names=["default", "second"])
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["default", "nope", "__base__"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names="default")
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(input_ids=ids, adapter_names=["default"] * 3)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["default"] * 3)
    model.unmerge_adapter()
    # a failure inside the call still clears the per-layer state
    with pytest.raises(Exception):
        model(input_ids=ids[:, :0].float(), adapter_names=["default"] * 3)
    assert all(m.mixed is None for m in model.model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(logits(model, ids),
                               logits(model, ids, adapter_names=["default"] * 3), atol=TOL, rtol=0)
