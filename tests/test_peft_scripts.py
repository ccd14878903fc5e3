"""PEFT / TRL user scripts, in the styles of their documentation and of common tutorials, each run
twice in fresh processes at the same time: with `peft` / `trl` imports and with lorakit's
(tests/user_scripts.py). For each: the lorakit run completes; what it saves loads in PEFT (or in
transformers, for a merged model) with the logits lorakit computed; and where both runs see the
same batches (manual loops; SFTTrainer with one batch of every row per step) the adapters of the
two runs agree tensor by tensor.

Tolerances (fp32 on a CPU): PEFT's logits for lorakit's files within LOGITS_ATOL of lorakit's
own; the peft-side and lorakit-side adapters within ADAPTER_ATOL (the same seed draws the same
initial adapters, and the batches are the same, so what differs is float rounding; the largest
difference measured is in the closing note of issue 15).
"""

from __future__ import annotations

import json
import textwrap

import peft
import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from user_scripts import logits_diff, max_abs_diff, run_both

LOGITS_ATOL = 1e-5
ADAPTER_ATOL = 1e-5


def measured(what: str, value: float, atol: float) -> None:
    """Print a measured difference (shown by `pytest -rP`) and check it against `atol`."""
    print(f"measured: {what}: max |diff| = {value:.3g} (atol {atol:g})")
    assert value <= atol, what

# What the SFTTrainer scripts end with: the trained model's logits on a fixed prompt, for the
# test to compare with what PEFT computes from the saved files.
SAVE_LOGITS = """
    model = trainer.model.eval()
    ids = tokenizer("2 plus 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save({{"ids": ids, "logits": model(input_ids=ids).logits}}, out + "/logits.pt")
"""


def peft_logits(base: torch.nn.Module, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's logits for an adapter directory on `base`."""
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_peft_loads_lorakit_files(out, model_dir) -> None:
    """PEFT computes, from the adapter the lorakit run saved in out/final, its logits."""
    saved = torch.load(out / "logits.pt")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    measured("PEFT's logits for lorakit's adapter vs lorakit's",
             logits_diff(peft_logits(base, out / "final", saved["ids"]), saved["logits"]),
             LOGITS_ATOL)


# (a) TRL's chat quickstart: "messages" rows, an eval set evaluated every 2 steps, and an
# early-stopping TrainerCallback that ends the run after step 3 of 10.
CHAT = textwrap.dedent("""
    import json, sys
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from {peft_lib} import LoraConfig
    from {trl_lib} import SFTConfig, SFTTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    def chat(a, b):
        return {{"messages": [{{"role": "system", "content": "You add numbers."}},
                             {{"role": "user", "content": f"{{a}} plus {{b}}?"}},
                             {{"role": "assistant", "content": str(a + b)}}]}}
    train = Dataset.from_list([chat(a, b) for a in range(4) for b in range(4)])
    test = Dataset.from_list([chat(a, b) for a in range(4, 6) for b in range(2)])

    class StopAfter(TrainerCallback):
        def __init__(self, steps):
            self.steps, self.events = steps, []
        def on_step_end(self, args, state, control, **kwargs):
            self.events.append(("step_end", state.global_step))
            if state.global_step >= self.steps:
                control.should_training_stop = True
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.events.append(("evaluate", state.global_step, "eval_loss" in metrics))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop = StopAfter(3)
    args = SFTConfig(output_dir=out, max_steps=10, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, eval_strategy="steps", eval_steps=2,
                     max_length=128, seed=0, report_to="none", bf16=False)
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=train, eval_dataset=test,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[stop])
    trainer.train()
    trainer.save_model(out + "/final")
""" + SAVE_LOGITS + """
    print(json.dumps({{"global_step": trainer.state.global_step, "events": stop.events,
                      "eval_loss": trainer.evaluate()["eval_loss"]}}))
""")


@pytest.mark.slow
@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer and chat template
def test_chat_script_with_early_stopping_callback(tmp_path, tiny_chat_dir):
    # transformers' TrainerCallback module imports peft itself: only trl must stay out
    res = run_both(CHAT, tmp_path, tiny_chat_dir, forbidden=frozenset({"trl"}))
    for lib in ("peft", "lorakit"):
        # stopped by the callback after step 3; evaluated at step 2 (eval_steps) on both
        assert res[lib]["global_step"] == 3, lib
        events = [tuple(e) for e in res[lib]["events"]]
        assert [e for e in events if e[0] == "step_end"] == [("step_end", s) for s in (1, 2, 3)]
        assert ("evaluate", 2, True) in events, (lib, events)
    assert res["lorakit"]["eval_loss"] == res["lorakit"]["eval_loss"]  # not NaN
    out = tmp_path / "lorakit"
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()  # the final save
    check_peft_loads_lorakit_files(out, tiny_chat_dir)


# (b) Text rows whose text is in a column not called "text" (the tutorials' english_quotes).
# One batch of all 8 rows per step: both runs train on the same batches.
TEXT = textwrap.dedent("""
    import json, sys
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from {peft_lib} import LoraConfig
    from {trl_lib} import SFTConfig, SFTTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    quotes = ["Be yourself; everyone else is already taken.", "So many books, so little time.",
              "A room without books is like a body without a soul.", "You only live once.",
              "Be the change that you wish to see in the world.",
              "Without music, life would be a mistake.", "We accept the love we think we deserve.",
              "Imperfection is beauty, madness is genius."]
    dataset = Dataset.from_dict({{"quote": quotes, "author": ["anonymous"] * len(quotes)}})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=out, dataset_text_field="quote", max_length=64,
                     per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                     logging_steps=1, seed=0, report_to="none", bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config)
    trainer.train()
    trainer.save_model(out + "/final")
""" + SAVE_LOGITS + """
    print(json.dumps({{"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}}))
""")


@pytest.mark.slow
@pytest.mark.default_model
def test_text_field_script_trains_the_same_adapter(tmp_path, tiny_chat_dir):
    res = run_both(TEXT, tmp_path, tiny_chat_dir)
    assert res["lorakit"]["losses"] == pytest.approx(res["peft"]["losses"], rel=1e-5)
    assert len(res["lorakit"]["losses"]) == 3
    measured("adapters, peft+trl run vs lorakit run",
             max_abs_diff(tmp_path / "peft" / "final", tmp_path / "lorakit" / "final"),
             ADAPTER_ATOL)
    check_peft_loads_lorakit_files(tmp_path / "lorakit", tiny_chat_dir)


# (c) QLoRA as the PEFT docs write it: BitsAndBytesConfig nf4 through transformers,
# prepare_model_for_kbit_training, get_peft_model, then SFTTrainer.
QLORA = textwrap.dedent("""
    import json, sys
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from {peft_lib} import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from {trl_lib} import SFTConfig, SFTTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config)
    model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{{"text": f"### Question: what is {{a}} times {{b}}? ### Answer: {{a * b}}"}}
            for a in range(2, 4) for b in range(2, 6)]
    args = SFTConfig(output_dir=out, per_device_train_batch_size=8, max_steps=3,
                     learning_rate=2e-3, logging_steps=1, max_length=64, seed=0,
                     optim="paged_adamw_32bit", report_to="none", bf16=False,
                     gradient_checkpointing_kwargs={{"use_reentrant": False}})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out + "/final")
""" + SAVE_LOGITS + """
    print(json.dumps({{"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}}))
""")


@pytest.fixture(scope="session")
def tiny_qlora_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama whose layer widths are multiples of 32 and 64 (bitsandbytes' CPU
    layouts), with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-qlora-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.default_model
def test_qlora_script(tmp_path, tiny_qlora_dir):
    pytest.importorskip("bitsandbytes")
    res = run_both(QLORA, tmp_path, tiny_qlora_dir)
    # TRL casts a quantized model's trainable parameters to bf16 (lorakit keeps them in fp32),
    # so the adapters are not compared; the losses of the same batches follow each other
    ours, theirs = res["lorakit"]["losses"], res["peft"]["losses"]
    print(f"measured: QLoRA losses lorakit {ours} vs peft+trl {theirs}")
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)
    assert ours == pytest.approx(theirs, rel=1e-3)
    out = tmp_path / "lorakit"
    saved = torch.load(out / "logits.pt")
    base = AutoModelForCausalLM.from_pretrained(
        tiny_qlora_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    # in eval mode, bitsandbytes would repack its 4-bit weights (on AVX512-BF16 CPUs) into a
    # layout that computes in bf16, which lorakit never uses: PEFT in train mode (no dropout
    # here) computes on the regular layout, as lorakit does
    model = peft.PeftModel.from_pretrained(base, out / "final").train()
    with torch.no_grad():
        theirs = model(input_ids=saved["ids"]).logits
    measured("PEFT's logits for lorakit's QLoRA adapter vs lorakit's",
             logits_diff(theirs, saved["logits"]), LOGITS_ATOL)


# PEFT-only scripts: tiny random models from conftest, manual training loops on fixed batches.
# Two adapters trained a few steps each on their own random "task", saved to out/<name>.
TRAIN_TWO = """
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_llama
    from {lib} import LoraConfig, PeftModel, get_peft_model

    out = sys.argv[1]
    def train(name, seed):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(make_tiny_llama(), config)
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(f"{{out}}/{{name}}")
    train("sql", 1)
    train("poems", 2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
    logits = {{}}
"""
END_TWO = """
    torch.save({{"ids": ids, "logits": logits}}, out + "/logits.pt")
    print(json.dumps({{"adapters": sorted(logits)}}))
"""

# (d) Several adapters on one base: load, switch, disable.
MULTI_ADAPTER = textwrap.dedent(TRAIN_TWO + """
    model = PeftModel.from_pretrained(make_tiny_llama(), out + "/sql", adapter_name="sql")
    model.load_adapter(out + "/poems", adapter_name="poems")
    assert model.active_adapter == "sql"
    with torch.no_grad():
        for name in ("sql", "poems"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            logits["base"] = model(input_ids=ids).logits
    assert not torch.allclose(logits["sql"], logits["poems"])
""" + END_TWO)


def check_adapters_and_logits(tmp_path, names) -> dict:
    """The two runs' adapters agree tensor by tensor, and their logits; PEFT computes lorakit's
    logits from lorakit's files. The lorakit run's saved logits."""
    for name in names:
        measured(f"adapter {name}, peft run vs lorakit run",
                 max_abs_diff(tmp_path / "peft" / name, tmp_path / "lorakit" / name),
                 ADAPTER_ATOL)
    ours = torch.load(tmp_path / "lorakit" / "logits.pt")
    theirs = torch.load(tmp_path / "peft" / "logits.pt")
    assert torch.equal(ours["ids"], theirs["ids"])
    for name in ours["logits"]:
        measured(f"logits {name}, peft run vs lorakit run",
                 logits_diff(ours["logits"][name], theirs["logits"][name]), LOGITS_ATOL)
    return ours


def test_multi_adapter_load_and_switch_script(tmp_path):
    res = run_both(MULTI_ADAPTER, tmp_path)
    assert res["lorakit"]["adapters"] == ["base", "poems", "sql"]
    ours = check_adapters_and_logits(tmp_path, ["sql", "poems"])
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lorakit" / "sql",
                                           adapter_name="sql")
    model.load_adapter(tmp_path / "lorakit" / "poems", adapter_name="poems")
    model.eval()
    with torch.no_grad():
        for name in ("sql", "poems"):
            model.set_adapter(name)
            measured(f"PEFT's logits for lorakit's {name} vs lorakit's",
                     logits_diff(model(input_ids=ours["ids"]).logits, ours["logits"][name]),
                     LOGITS_ATOL)


# (e) Weighted combinations of two adapters into new ones, one saved on its own.
WEIGHTED = textwrap.dedent(TRAIN_TWO + """
    model = PeftModel.from_pretrained(make_tiny_llama(), out + "/sql", adapter_name="sql")
    model.load_adapter(out + "/poems", adapter_name="poems")
    model.add_weighted_adapter(["sql", "poems"], [0.7, 0.3], "mix_linear",
                               combination_type="linear")
    model.add_weighted_adapter(["sql", "poems"], [1.0, -0.5], "mix_cat", combination_type="cat")
    model.eval()
    with torch.no_grad():
        for name in ("mix_linear", "mix_cat"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits
    model.save_pretrained(out + "/saved", selected_adapters=["mix_cat"])
""" + END_TWO)


def test_weighted_adapter_script(tmp_path):
    res = run_both(WEIGHTED, tmp_path)
    assert res["lorakit"]["adapters"] == ["mix_cat", "mix_linear"]
    ours = check_adapters_and_logits(tmp_path, ["sql", "poems", "saved/mix_cat"])
    cat = json.loads((tmp_path / "lorakit" / "saved" / "mix_cat" / "adapter_config.json")
                     .read_text())
    assert cat["r"] == 16  # "cat" concatenates the two rank-8 adapters
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lorakit" / "saved"
                                           / "mix_cat").eval()
    with torch.no_grad():
        measured("PEFT's logits for lorakit's saved mix_cat vs lorakit's",
                 logits_diff(model(input_ids=ours["ids"]).logits, ours["logits"]["mix_cat"]),
                 LOGITS_ATOL)


# (f) Resume: a first trainer stops at max_steps=2; a second one, with max_steps=4, continues
# from the latest checkpoint; the script reads trainer_state.json as people's scripts do.
RESUME = textwrap.dedent("""
    import json, sys
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from {peft_lib} import LoraConfig
    from {trl_lib} import SFTConfig, SFTTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    dataset = Dataset.from_list([{{"text": f"{{a}} plus {{b}} is {{a + b}}"}}
                                 for a in range(2) for b in range(4)])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj"])
    def trainer_for(max_steps):
        args = SFTConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=8,
                         learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                         save_steps=2, max_length=64, seed=0, report_to="none", bf16=False)
        return SFTTrainer(model=model_dir, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer_for(2).train()
    trainer = trainer_for(4)
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model(out + "/final")
    with open(out + "/checkpoint-4/trainer_state.json") as f:
        state = json.load(f)
""" + SAVE_LOGITS + """
    print(json.dumps({{"global_step": state["global_step"],
                      "logged_steps": [r["step"] for r in state["log_history"] if "loss" in r],
                      "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}}))
""")


@pytest.mark.slow
@pytest.mark.default_model
def test_resume_from_checkpoint_script(tmp_path, tiny_chat_dir):
    res = run_both(RESUME, tmp_path, tiny_chat_dir)
    for lib in ("peft", "lorakit"):
        assert res[lib]["global_step"] == 4 and res[lib]["logged_steps"] == [1, 2, 3, 4], lib
    assert res["lorakit"]["losses"] == pytest.approx(res["peft"]["losses"], rel=1e-5)
    measured("adapters, peft+trl run vs lorakit run",
             max_abs_diff(tmp_path / "peft" / "final", tmp_path / "lorakit" / "final"),
             ADAPTER_ATOL)
    check_peft_loads_lorakit_files(tmp_path / "lorakit", tiny_chat_dir)


# (g) Merge and save: the trained adapter merged into the base, saved as a plain transformers
# model, reloaded with AutoModelForCausalLM.
MERGE = textwrap.dedent(TRAIN_TWO + """
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(make_tiny_llama(), out + "/sql").eval()
    with torch.no_grad():
        logits["adapter"] = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(out + "/merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out + "/merged").eval()
    with torch.no_grad():
        logits["merged"] = reloaded(input_ids=ids).logits
    assert torch.allclose(logits["merged"], logits["adapter"], atol=1e-5)
""" + END_TWO)


def test_merge_and_save_script(tmp_path):
    run_both(MERGE, tmp_path)
    ours = check_adapters_and_logits(tmp_path, ["sql"])
    measured("merged model weights, peft run vs lorakit run",
             max_abs_diff(tmp_path / "peft" / "merged", tmp_path / "lorakit" / "merged",
                          "model.safetensors"), ADAPTER_ATOL)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lorakit" / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ids = ours["ids"]
        # lorakit's merged model computes what PEFT computes with lorakit's adapter
        measured("lorakit's merged model vs PEFT with lorakit's adapter",
                 logits_diff(merged(input_ids=ids).logits,
                             peft_logits(make_tiny_llama(), tmp_path / "lorakit" / "sql", ids)),
                 LOGITS_ATOL)



# (h) TRL's DPO quickstart style: DPOTrainer on chat preference pairs with a LoRA peft_config;
# one batch of every pair per step, so both runs see the same batches.
DPO = textwrap.dedent("""
    import json, sys
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from {peft_lib} import LoraConfig
    from {trl_lib} import DPOConfig, DPOTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{{"prompt": [{{"role": "user", "content": f"{{a}} plus {{b}}?"}}],
              "chosen": [{{"role": "assistant", "content": str(a + b)}}],
              "rejected": [{{"role": "assistant", "content": str(a + b + 1)}}]}}
            for a in range(3) for b in range(2)]
    args = DPOConfig(output_dir=out, per_device_train_batch_size=6, max_steps=3,
                     learning_rate=1e-3, logging_steps=1, max_length=64, seed=0, beta=0.1,
                     report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                     gradient_checkpointing=False)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trainer.save_model(out + "/final")
""" + SAVE_LOGITS + """
    print(json.dumps({{"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                      "accuracies": [r["rewards/accuracies"] for r in trainer.state.log_history
                                     if "rewards/accuracies" in r]}}))
""")


@pytest.mark.default_model
def test_dpo_script_trains_the_same_adapter(tmp_path, tiny_chat_dir):
    res = run_both(DPO, tmp_path, tiny_chat_dir)
    assert res["lorakit"]["losses"] == pytest.approx(res["peft"]["losses"], abs=1e-5)
    assert res["lorakit"]["losses"][0] == pytest.approx(0.693147, abs=1e-6)  # B = 0: log 2
    measured("adapters, peft+trl run vs lorakit run",
             max_abs_diff(tmp_path / "peft" / "final", tmp_path / "lorakit" / "final"),
             ADAPTER_ATOL)
    check_peft_loads_lorakit_files(tmp_path / "lorakit", tiny_chat_dir)
