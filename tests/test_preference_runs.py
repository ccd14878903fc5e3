"""Preference objectives the way users run them beyond one fp32 process: under torchrun (DPO on
2 processes trains the 1-process adapter), on a 4-bit base, and with bf16 autocast forced (so
every CPU runs the path the AVX-512-BF16 ones take by default)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_chat_model
from safetensors.torch import load_file
from test_distributed import torchrun
from test_dpo import ROWS as PAIRS
from test_dpo import run_cli
from test_kto import ROWS as KTO_ROWS

import lorakit
from lorakit.base import quantize_model
from lorakit.data.preference import PreferenceData

pytestmark = pytest.mark.default_model  # the tiny models borrow SmolLM2's tokenizer


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_under_torchrun_trains_the_one_process_adapter(tmp_path, tiny_chat_dir):
    """Global batch 6 (3 per rank × 2 ranks, or 6 in one process): the same adapter, in fp32
    (bf16 weights or autocast round differently for each split of the batch); metrics logged
    once."""
    data = write_rows(tmp_path / "pairs.jsonl", PAIRS * 2)
    common = ["train", "--objective", "dpo", "--model", tiny_chat_dir, "--data", data,
              "--max-steps", 3, "--lr", "1e-3", "--set", "training.logging_steps=1",
              "--set", "training.adam_epsilon=1e-4", "--set", "output.samples=0",
              "--set", "training.bf16=false", "--dtype", "float32"]
    res = run_cli(*common, "--output", tmp_path / "one", "--batch-size", 6)
    assert res.returncode == 0, res.stdout + res.stderr
    log = torchrun("-m", "lorakit", *common, "--output", tmp_path / "two", "--batch-size", 3)
    assert log.count("lorakit: finished step 3") == 1
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors")
                for d in ("one", "two"))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-4)
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("objective, rows", [("kto", KTO_ROWS), ("orpo", PAIRS)])
def test_kto_and_orpo_run_under_torchrun(tmp_path, tiny_chat_dir, objective, rows):
    data = write_rows(tmp_path / "rows.jsonl", rows * 2)
    log = torchrun("-m", "lorakit", "train", "--objective", objective, "--model", tiny_chat_dir,
                   "--data", data, "--output", tmp_path / "out", "--max-steps", 2,
                   "--batch-size", 3, "--lr", "1e-3", "--set", "training.logging_steps=1",
                   "--set", "output.samples=0")
    assert log.count("lorakit: finished step 2") == 1 and "error" not in log.lower()
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert all(r["loss"] == r["loss"] for r in logged if "loss" in r)  # finite, not NaN
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def random_pairs(vocab: int, n: int = 6) -> PreferenceData:
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    examples = [{"prompt_ids": ids(7), "chosen_ids": ids(4), "rejected_ids": ids(5)}
                for _ in range(n)]
    return PreferenceData(examples, rows=n, dropped=0, format="text")


def test_dpo_on_a_4bit_base(tmp_path):
    """QLoRA: the reference is the 4-bit base with the adapters off; the first loss is log 2
    (the policy starts at it) and ten steps lower it."""
    from test_qlora import VOCAB, tiny_llama

    trainer = lorakit.DPOTrainer(
        quantize_model(tiny_llama(), "nf4"),
        args=lorakit.DPOConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=10,
                               learning_rate=1e-2, logging_steps=1, bf16=False,
                               gradient_checkpointing=False, per_device_train_batch_size=6),
        train_dataset=random_pairs(VOCAB),
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_bf16_autocast_first_step_is_fp32_to_bf16_rounding(smol_tokenizer, tmp_path, objective):
    """bf16 autocast forced on (the default where the CPU computes bf16 fast): the first step's
    loss and metrics are fp32's to bf16 rounding, with the log-probs summed in fp32."""
    trainer_class, config, rows = {
        "dpo": (lorakit.DPOTrainer, lorakit.DPOConfig, PAIRS),
        "kto": (lorakit.KTOTrainer, lorakit.KTOConfig, KTO_ROWS),
        "orpo": (lorakit.ORPOTrainer, lorakit.ORPOConfig, PAIRS),
    }[objective]
    results = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        trainer = trainer_class(
            model=tiny_chat_model(smol_tokenizer),
            args=config(output_dir=str(tmp_path / str(bf16)), use_cpu=True, bf16=bf16,
                        gradient_checkpointing=False, max_length=64,
                        per_device_train_batch_size=len(rows)),
            train_dataset=rows, processing_class=smol_tokenizer,
            peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False),
        )
        batch = trainer.objective.collate(list(trainer.train_data.examples))
        with trainer.launch.autocast():
            terms = trainer.objective.loss(trainer.model, batch, training=True)
        assert trainer.launch.bf16 == bf16
        results.append((float(terms.loss.detach()), terms.sums))
    (fp32, fp32_sums), (bf16, bf16_sums) = results
    assert bf16 == pytest.approx(fp32, rel=0.05, abs=0.02)
    for key, value in fp32_sums.items():
        assert bf16_sums[key] == pytest.approx(value, rel=0.05, abs=0.05), key
