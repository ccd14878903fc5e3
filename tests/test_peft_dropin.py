"""PEFT user scripts run on lorakit with only their imports changed (the first steps of issue 15).

Each script is written as the PEFT documentation writes it, then run twice in fresh processes:
with `from peft import ...` and with `from lorakit import ...`. The lorakit run must complete,
and what it saves must load in PEFT with the logits lorakit computes.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from user_scripts import run_script

# A PEFT quickstart: config with TaskType, get_peft_model, a few manual steps, save, reload
# frozen with PeftModel.from_pretrained, disable_adapter(), a second adapter, merge_and_unload.
QUICKSTART = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_llama
    from {lib} import LoraConfig, PeftModel, TaskType, get_peft_model

    out = sys.argv[1]
    torch.manual_seed(0)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"], bias="none")
    model = get_peft_model(make_tiny_llama(), config)
    model.print_trainable_parameters()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out + "/adapter")
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)

    loaded = PeftModel.from_pretrained(make_tiny_llama(), out + "/adapter")
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen unless is_trainable
    loaded.load_adapter(out + "/adapter", adapter_name="second")
    loaded.set_adapter("default")
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, tuned, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, tuned, atol=1e-4)
    torch.save(ids, out + "/ids.pt")
    torch.save(tuned, out + "/tuned.pt")
    print(json.dumps({{"loss": float(loss)}}))
""")


@pytest.mark.parametrize("lib", ["peft", "lorakit"])
def test_peft_quickstart_runs_on_both(lib, tmp_path):
    run_script(QUICKSTART, lib, tmp_path / lib)


def test_lorakit_quickstart_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    import peft
    import torch
    from conftest import make_tiny_llama

    out = tmp_path / "lorakit"
    run_script(QUICKSTART, "lorakit", out)
    ids, tuned = torch.load(out / "ids.pt"), torch.load(out / "tuned.pt")
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tuned, atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8


def test_peft_names_are_aliases_not_copies():
    import lorakit

    assert lorakit.PeftModel is lorakit.LoraModel
    assert lorakit.get_peft_model is lorakit.get_lora_model
    assert lorakit.LoraModel.disable_adapter is lorakit.LoraModel.disable_adapters
    assert lorakit.TaskType.CAUSAL_LM == "CAUSAL_LM"


def test_prepare_model_for_kbit_training_has_peft_defaults():
    """As in PEFT: gradient checkpointing on unless use_gradient_checkpointing=False."""
    from conftest import make_tiny_llama

    from lorakit import prepare_model_for_kbit_training

    on = prepare_model_for_kbit_training(make_tiny_llama())
    off = prepare_model_for_kbit_training(make_tiny_llama(), use_gradient_checkpointing=False)
    assert on.is_gradient_checkpointing and not off.is_gradient_checkpointing
    assert not any(p.requires_grad for p in on.parameters())


# TRL's SFT quickstart with a PEFT config: a model path, SFTConfig, a datasets.Dataset of
# prompt/completion rows, processing_class, peft_config; train, save_model, state.log_history.
TRL_PROMPT_COMPLETION = textwrap.dedent("""
    import json, sys
    from datasets import Dataset
    from transformers import AutoTokenizer
    from {peft_lib} import LoraConfig
    from {trl_lib} import SFTConfig, SFTTrainer

    out, model_dir = sys.argv[1], sys.argv[2]
    rows = [{{"prompt": [{{"role": "user", "content": f"{{a}} plus {{b}}?"}}],
              "completion": [{{"role": "assistant", "content": str(a + b)}}]}}
            for a in range(6) for b in range(6)]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=out, max_steps=4, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, save_steps=2, seed=0,
                     max_length=64, report_to="none", bf16=False)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trainer.save_model(out + "/final")
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(json.dumps({{"losses": losses}}))
""")


@pytest.mark.slow
@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer
@pytest.mark.parametrize("lib", ["peft", "lorakit"])  # peft + trl imports, or lorakit's
def test_trl_sft_script_runs_on_both(lib, tmp_path, tiny_chat_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / lib
    losses = run_script(TRL_PROMPT_COMPLETION, lib, out, tiny_chat_dir)["losses"]
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))  # one per step, no NaN
    # checkpoints as HF tools read them: the adapter at the root, trainer_state.json's keys
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [r["loss"] for r in state["log_history"]
                                          if "loss" in r] == pytest.approx(losses)
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    # the saved adapter loads in PEFT, and PEFT computes what the adapter holds
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    model = peft.PeftModel.from_pretrained(base, out / "final").eval()
    assert model.peft_config["default"].r == 8
    ids = AutoTokenizer.from_pretrained(tiny_chat_dir)("2 plus 3?", return_tensors="pt")
    with torch.no_grad():
        theirs = model(**ids).logits
        assert torch.isfinite(theirs).all()
        if lib == "lorakit":  # the same logits in lorakit as in PEFT
            from lorakit import PeftModel as LorakitPeftModel
            ours = LorakitPeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_chat_dir), out / "final").eval()
            assert torch.allclose(ours(**ids).logits, theirs, atol=1e-5)


# -- SFTConfig: TRL's options, TRL's defaults, and what lorakit refuses --------------------------
@pytest.mark.parametrize("option,value,shown", [
    ("neftune_noise_alpha", 5.0, "neftune_noise_alpha"),
    ("push_to_hub", True, "push_to_hub"),
    ("max_seq_length", 512, "max_seq_length (TRL renamed it max_length)"),
])
def test_sftconfig_refuses_unsupported_options_by_name(option, value, shown):
    from lorakit import SFTConfig
    from lorakit.errors import UserError

    with pytest.raises(TypeError) as caught:
        SFTConfig(output_dir="out", **{option: value})
    message = str(caught.value)
    assert isinstance(caught.value, UserError)  # the CLI's one-line error
    assert message.startswith(f"SFTConfig: lorakit does not support {shown};")
    assert "\n" not in message


@pytest.mark.parametrize("option,value", [("optim", "adamw_8bit"), ("save_strategy", "epoch"),
                                          ("eval_strategy", "epoch"),
                                          ("completion_only_loss", False)])
def test_sftconfig_refuses_values_it_cannot_follow(option, value):
    from lorakit import SFTConfig
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"SFTConfig.{option}={value!r} is not supported"):
        SFTConfig(**{option: value})


def test_sftconfig_gpu_options_are_accepted_and_reported_once(monkeypatch):
    import warnings

    from lorakit import SFTConfig
    from lorakit.training import config

    monkeypatch.setattr(config, "_REPORTED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # e.g. a first and a resuming trainer
            SFTConfig(tf32=True, use_liger_kernel=True, optim="paged_adamw_32bit",
                      report_to="none")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "tf32" in message and "use_liger_kernel" in message and "paged" in message
    assert "report_to" not in message  # "none" asks for nothing


def test_sftconfig_defaults_are_trls():
    trl = pytest.importorskip("trl")
    from lorakit import SFTConfig

    theirs = trl.SFTConfig(output_dir="out", bf16=False, report_to="none")
    ours = SFTConfig(output_dir="out")
    for name in ("learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "logging_steps", "save_steps", "save_total_limit", "seed", "warmup_steps",
                 "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "packing", "dataset_text_field", "gradient_checkpointing", "completion_only_loss",
                 "assistant_only_loss", "optim", "eval_strategy", "save_strategy", "use_cpu"):
        value = getattr(theirs, name)
        assert getattr(ours, name) == getattr(value, "value", value), name


def test_sftconfig_model_loading_follows_trl():
    """A model id / path loads in fp32 unless model_init_kwargs names a dtype (TRL's rule);
    use_cpu and save_strategy="no" mean what they mean in TRL."""
    from lorakit import SFTConfig, TrainConfig
    from lorakit.training.trl_call import _load_kwargs

    assert _load_kwargs(SFTConfig()) == {"dtype": "float32"}
    assert _load_kwargs(SFTConfig(model_init_kwargs={"torch_dtype": "bfloat16",
                                                     "attn_implementation": "eager"})) \
        == {"dtype": "bfloat16", "attn_implementation": "eager"}
    assert _load_kwargs(TrainConfig()) == {"dtype": "auto"}  # lorakit's own default
    assert SFTConfig(use_cpu=True).device == "cpu"
    assert SFTConfig(save_strategy="no").save_steps is None
