"""The training fast paths compute the plain path's numbers: chunked output head + loss, and the
shared-prefix forward (with and without gradient checkpointing)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_gpt2, make_tiny_llama, perturb_trainables
from lorakit import LoraConfig, get_lora_model
from lorakit.base.quantize import enable_checkpointing
from lorakit.training.loss import causal_lm_loss, head_loss
from lorakit.training.prefix import (pack_on_shared_prefix, prefix_sharing_problem,
                                     shared_prefix_length)


# ----------------------------------------------------------------------------- chunked head + loss

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_head_loss_matches_full_logits_float64(bias, train_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).double().requires_grad_(train_head)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,))
    loss, correct = head_loss(hidden, head, y, chunk_rows=5)  # 5 chunks, the last one short
    loss.mul(0.37).backward()
    got = [hidden.grad] + ([p.grad for p in head.parameters()] if train_head else [])

    ref_h = hidden.detach().clone().requires_grad_()
    ref_head = nn.Linear(16, 50, bias=bias).double().requires_grad_(train_head)
    ref_head.load_state_dict(head.state_dict())
    logits = ref_head(ref_h)
    ref = F.cross_entropy(logits, y, reduction="sum")
    ref.mul(0.37).backward()
    want = [ref_h.grad] + ([p.grad for p in ref_head.parameters()] if train_head else [])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    assert int(correct) == int((logits.argmax(-1) == y).sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_chunked_head_loss_without_grad_and_under_bf16_autocast():
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    y = torch.randint(0, 40, (9,))
    with torch.no_grad():
        loss, _ = head_loss(hidden, head, y, chunk_rows=4)
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden), y, reduction="sum"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # same bf16 roundings as the plain path
        loss, _ = head_loss(hidden, head, y, chunk_rows=4)
        ref = F.cross_entropy(head(hidden).float(), y, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-3)  # bf16 matmuls on both sides


# --------------------------------------------------------------------------------- shared prefix

def _batch(prefix: list[int], tails: list[list[int]], n_prompt: int) -> dict[str, torch.Tensor]:
    """Rows = prefix + tail, right-padded; the first len(prefix) + n_prompt tokens are prompt."""
    rows = [prefix + t for t in tails]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        start = len(prefix) + n_prompt
        labels[i, start:len(r)] = ids[i, start:len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(make, **kw):
    model = get_lora_model(make(**kw), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        perturb_trainables(model)  # B != 0: the adapters change the forward
    return model.train()


def test_shared_prefix_length_stops_at_differences_padding_and_trained_targets():
    b = _batch(list(range(3, 15)), [[20, 21, 22, 23], [20, 21, 30], [20, 40, 41, 42, 43]], 1)
    # positions 0-12 hold the same tokens in every row, but position 12 (token 20) is trained to
    # predict the next token, so its hidden state must stay per row: 12 shared positions
    # 12 shared prefix tokens + token 20 in every row; the token after 20 is labelled, so 20 is
    # the last shared position whose next token is not trained -> 13... but labels start at
    # position 13 (after prefix + 1 prompt token): position 12's target is trained
    assert shared_prefix_length(b) == 12
    assert shared_prefix_length(_batch(list(range(3, 15)), [[20, 21], [20, 22]], 5)) == 13
    assert shared_prefix_length(_batch([3, 4, 5], [[6, 7], [6, 8]], 1)) == 0  # too short to pay
    one_row = _batch(list(range(3, 15)), [[20, 21]], 1)
    assert shared_prefix_length(one_row) == 0


@pytest.mark.parametrize("make,attn", [(make_tiny_llama, "sdpa"), (make_tiny_llama, "eager"),
                                       (make_tiny_gpt2, "sdpa")],
                         ids=["llama-sdpa", "llama-eager", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_forward_matches_plain_forward(make, attn, checkpointing):
    model = _lora(make, attn_implementation=attn)
    hf = model.model
    assert hf.config._attn_implementation == attn
    assert prefix_sharing_problem(hf) is None
    if checkpointing:
        enable_checkpointing(hf)
        layers = hf.transformer.h if make is make_tiny_gpt2 else hf.model.layers
        assert all(layer.gradient_checkpointing for layer in layers)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 100, (11,), generator=g).tolist()
    tails = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (7, 4, 9, 5)]
    batch = _batch(prefix, tails, n_prompt=2)
    assert shared_prefix_length(batch) == 11  # the tails differ from their first token
    packed = pack_on_shared_prefix(batch, 11, hf.base_model)
    assert packed is not None and packed.inputs["input_ids"].shape == (1, 11 + 7 + 4 + 9 + 5)

    def run(share: bool):
        model.zero_grad(set_to_none=True)
        parts = causal_lm_loss(hf, batch, count_correct=True, share_prefix=share)
        parts.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return parts, grads

    plain, g_plain = run(False)
    shared, g_shared = run(True)
    assert (shared.n_tokens, shared.n_correct) == (plain.n_tokens, plain.n_correct)
    torch.testing.assert_close(shared.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-5)
    assert g_plain.keys() == g_shared.keys() and g_plain
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_shared_prefix_on_a_4bit_base():
    """QLoRA: the NF4 base runs the packed row like any other input."""
    pytest.importorskip("bitsandbytes")
    from lorakit.base import prepare_for_kbit_training, quantize_model
    base = prepare_for_kbit_training(quantize_model(make_tiny_llama(seed=5), "nf4"))
    model = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        perturb_trainables(model)
    hf = model.train().model
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 100, (9,), generator=g).tolist()
    batch = _batch(prefix, [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 8, 3)],
                   n_prompt=1)
    assert pack_on_shared_prefix(batch, shared_prefix_length(batch), hf.model) is not None

    def run(share: bool):
        model.zero_grad(set_to_none=True)
        parts = causal_lm_loss(hf, batch, share_prefix=share)
        parts.loss_sum.backward()
        return parts.loss_sum, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    (loss, grads), (loss_ref, grads_ref) = run(True), run(False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for g_, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g_, g_ref, rtol=1e-4, atol=1e-5)


def test_packed_rows_see_only_the_prefix_and_themselves():
    """The packed row's hidden states equal each row's own plain forward, position by
    position (a row that could see another row would differ)."""
    hf = _lora(make_tiny_llama).model.eval()
    prefix = list(range(10, 20))
    batch = _batch(prefix, [[30, 31, 32], [40, 41, 42, 43, 44], [50]], n_prompt=1)
    packed = pack_on_shared_prefix(batch, 10, hf.model)
    with torch.no_grad():
        hidden = hf.model(**packed.inputs, use_cache=False).last_hidden_state[0]
        at = 10
        for row, tail in enumerate([[30, 31, 32], [40, 41, 42, 43, 44], [50]]):
            alone = hf.model(input_ids=torch.tensor([prefix + tail])).last_hidden_state[0]
            if row == 0:
                torch.testing.assert_close(hidden[:10], alone[:10])
            torch.testing.assert_close(hidden[at:at + len(tail)], alone[10:])
            at += len(tail)
    assert at == hidden.shape[0]
    # each position's target is the row's next label; the prompt token after the prefix and
    # each row's last token have none
    assert packed.targets.tolist() == [-100] * 10 + [31, 32, -100, 41, 42, 43, 44, -100, -100]


def test_packing_declined_where_attention_would_cost_more():
    hf = _lora(make_tiny_llama).model
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 100, (8,), generator=g).tolist()
    long_tails = [torch.randint(3, 100, (200,), generator=g).tolist() for _ in range(4)]
    batch = _batch(prefix, long_tails, n_prompt=1)
    assert shared_prefix_length(batch) == 8
    assert pack_on_shared_prefix(batch, 8, hf.model) is None  # 4 x 208 tokens, 8 shared
    short = _batch(prefix, [t[:3] for t in long_tails], n_prompt=1)
    assert pack_on_shared_prefix(short, 8, hf.model) is not None
    # per-token inputs it does not know how to repack: the plain forward
    extra = {**short, "token_type_ids": torch.zeros_like(short["input_ids"])}
    assert pack_on_shared_prefix(extra, 8, hf.model) is None
    # and the loss then takes the plain forward
    plain = causal_lm_loss(hf, batch, share_prefix=False)
    shared = causal_lm_loss(hf, batch, share_prefix=True)
    assert torch.equal(plain.loss_sum, shared.loss_sum)


def test_prefix_sharing_refused_with_dropout():
    model = get_lora_model(make_tiny_llama(), LoraConfig(r=4, lora_dropout=0.1,
                                                         target_modules=["q_proj"]))
    assert "dropout" in prefix_sharing_problem(model.model)
    assert "attention_dropout" in prefix_sharing_problem(make_tiny_llama(attention_dropout=0.1))


def test_prefix_sharing_refused_without_a_custom_mask_or_with_sliding_windows():
    model = make_tiny_llama()
    model.config._attn_implementation = "flash_attention_2"  # takes no mask: rows would mix
    assert "flash_attention_2" in prefix_sharing_problem(model)
    from transformers import MistralConfig, MistralForCausalLM
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
    assert "sliding-window" in prefix_sharing_problem(mistral)


# ------------------------------------------------------------------------------------ in training

def _prefixed_rows(n: int, seed: int = 0):
    """A fixed 12-token 'system prompt', a random question, a fixed answer (chat SFT's shape)."""
    from lorakit.data import SFTData
    g = torch.Generator().manual_seed(seed)
    system = list(range(90, 102))
    examples = []
    for _ in range(n):
        q = torch.randint(3, 80, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        prompt = system + q.tolist()
        answer = [10, 20, 30, 40]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return SFTData(examples)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_with_shared_prefix_trains_the_same_adapters(tmp_path, checkpointing,
                                                              monkeypatch):
    from lorakit import SFTTrainer, TrainConfig
    from lorakit.training import loss as loss_module

    calls = []
    real = loss_module.pack_on_shared_prefix

    def spy(*a):
        packed = real(*a)
        calls.append(packed.prefix if packed is not None else None)
        return packed
    monkeypatch.setattr(loss_module, "pack_on_shared_prefix", spy)

    def train(share: bool):
        model = get_lora_model(make_tiny_llama(seed=4), LoraConfig(r=4, lora_alpha=8))
        args = TrainConfig(output_dir=str(tmp_path / str(share)), max_steps=6, learning_rate=1e-2,
                           per_device_train_batch_size=4, save_steps=None, bf16=False,
                           disable_tqdm=True, share_prefix=share,
                           gradient_checkpointing=checkpointing)
        trainer = SFTTrainer(model, args, train_data=_prefixed_rows(16),
                             eval_data=_prefixed_rows(8, seed=1))
        assert trainer.prefix_off == ({"train": None, "eval": None} if share else
                                      {"train": "share_prefix=False", "eval": "share_prefix=False"})
        result = trainer.train()
        return model, result

    plain, r_plain = train(False)
    assert calls == []
    shared, r_shared = train(True)
    assert len(calls) == 6 + 1 and set(calls) == {12}  # 6 steps and 1 eval batch, packed
    assert r_plain.metrics["eval_loss"] == pytest.approx(r_shared.metrics["eval_loss"], rel=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), shared.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
