"""Shared fixtures: tiny random models built from configs (no weights are downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def make_tiny_llama(attention_bias: bool = False, vocab_size: int = VOCAB, seed: int = 0,
                    tie_word_embeddings: bool = False, max_position_embeddings: int = 256,
                    **kw) -> LlamaForCausalLM:
    """A 2-layer Llama-style model (q/k/v/o, gate/up/down), random weights, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_position_embeddings,
                      attention_bias=attention_bias,
                      tie_word_embeddings=tie_word_embeddings, **kw)
    return LlamaForCausalLM(cfg).eval()


def make_tiny_gpt2(vocab_size: int = VOCAB, seed: int = 0, **kw) -> GPT2LMHeadModel:
    """A 2-layer GPT-2-style model; its projections are transformers `Conv1D` (weight in×out)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                     eos_token_id=2, **kw)
    return GPT2LMHeadModel(cfg).eval()


def make_tiny_moe(vocab_size: int = VOCAB, seed: int = 0, **kw):
    """A 2-layer Qwen3-MoE-style model: 4 experts (2 per token) fused into 3-D parameters
    (`mlp.experts.gate_up_proj` [4, 64, 32], `down_proj` [4, 32, 32]) and a router `mlp.gate`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=256, **kw)
    return Qwen3MoeForCausalLM(cfg).eval()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU decoding kernel once, up front (on a fresh machine it takes about a
    minute), so that no test's time limit, or the first server a test starts, pays for it."""
    from lorakit.lora.decode_kernel import decode_kernel
    decode_kernel()


def pytest_report_header(config: pytest.Config) -> str:
    """The machine under the results: CPU vector features decide bf16 autocast and 4-bit paths."""
    from lorakit.base.loading import machine_summary
    return machine_summary()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.option.verbose < 0:  # -q (as in `make test`) hides the header: say it at the end
        from lorakit.base.loading import machine_summary
        terminalreporter.write_line(f"machine: {machine_summary()}")


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 11), generator=g)


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M converted into the lorakit cache (tests marked default_model)."""
    from lorakit.base.default_model import default_model_dir as _dir
    return _dir()


@pytest.fixture(scope="session")
def smol_tokenizer(default_model_dir):
    """SmolLM2's real tokenizer and chat template, from the cached default model."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama saved as a model directory with SmolLM2's tokenizer and chat template:
    what the CLI tests pass as --model."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"), smol_tokenizer)


def tiny_chat_model(tokenizer, **model_kw) -> LlamaForCausalLM:
    """A tiny random Llama sized to `tokenizer` (make_tiny_llama's `model_kw`)."""
    return make_tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2, **model_kw)


def save_tiny_chat_model(path, tokenizer, model: LlamaForCausalLM | None = None):
    """Save `model` (default: `tiny_chat_model`) with `tokenizer` beside it as a model
    directory at `path`."""
    (model or tiny_chat_model(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_sum_rows(path, n: int, start: int = 0) -> None:
    """Chat prompt/completion rows "a plus b?" -> "a+b" (a, b < 6), rows [start, start + n)."""
    import json
    rows = [{"prompt": [{"role": "user", "content": f"{a} plus {b}?"}],
             "completion": [{"role": "assistant", "content": str(a + b)}]}
            for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + n]))


def logged_steps(out) -> int:
    """The last step a `lorakit train` run into `out` has logged to metrics.jsonl (0: none yet);
    a line still being written is not counted."""
    import json
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


@torch.no_grad()
def perturb_trainables(model: torch.nn.Module, seed: int = 3) -> None:
    """Make every trainable tensor (adapters, biases, saved copies) differ from its start."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
