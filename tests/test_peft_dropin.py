"""PEFT user scripts run on lorakit with only their imports changed (the first steps of issue 15).

Each script is written as the PEFT documentation writes it, then run twice in fresh processes:
with `from peft import ...` and with `from lorakit import ...`. The lorakit run must complete,
and what it saves must load in PEFT with the logits lorakit computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

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


def run_script(template: str, lib: str, out: Path) -> dict:
    script = out / f"script_{lib}.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(template.format(tests=str(TESTS), lib=lib))
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


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

    model_dir, out = sys.argv[2], sys.argv[1]
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
@pytest.mark.parametrize("libs", [("peft", "trl"), ("lorakit", "lorakit")])
def test_trl_sft_script_runs_on_both(libs, tmp_path, tiny_chat_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_lib, trl_lib = libs
    out = tmp_path / trl_lib
    out.mkdir()
    script = out / "script.py"
    script.write_text(TRL_PROMPT_COMPLETION.format(peft_lib=peft_lib, trl_lib=trl_lib))
    res = subprocess.run([sys.executable, str(script), str(out), str(tiny_chat_dir)],
                         capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    losses = json.loads(res.stdout.strip().splitlines()[-1])["losses"]
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
        if trl_lib == "lorakit":  # the same logits in lorakit as in PEFT
            from lorakit import PeftModel as LorakitPeftModel
            ours = LorakitPeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_chat_dir), out / "final").eval()
            assert torch.allclose(ours(**ids).logits, theirs, atol=1e-5)
