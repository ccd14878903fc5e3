"""The continuous-batching engine behind `lorakit serve`, in process, on tiny random models.

Reference: each request run alone through transformers' `generate` (greedy) on a model that has
only that request's adapter, loaded by PEFT. The engine batches the same requests with mixed
adapters, admits them while others decode, evicts adapters (max_loras) and must give the same
tokens.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, make_tiny_moe, perturb_trainables
from peft import PeftModel

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.inference.adapters import AdapterPool
from lorakit.inference.batch import length_groups
from lorakit.inference.engine import PREFILL_PADDING_SLACK, Engine, Request, Sampling
from lorakit.lora import BASE_ADAPTER

MAKERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "moe": make_tiny_moe}
# on the Mixture-of-Experts model: attention, experts and routers (PEFT's all-linear)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
           "moe": "all-linear"}


class Tokenizer:
    """Token ids as text: enough for the engine (eos and decode), nothing to download."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module", params=["llama", "gpt2", "moe"])
def setup(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"engine-{kind}")
    paths = {}
    for i in range(3):
        model = get_lora_model(
            MAKERS[kind](), LoraConfig(r=2 + 2 * i, target_modules=TARGETS[kind],
                                       init_lora_weights=False)
        )
        perturb_trainables(model, seed=i)
        model.save_pretrained(root / f"a{i}")
        paths[f"a{i}"] = root / f"a{i}"
    return kind, paths


def engine_for(kind: str, paths, max_loras: int = 2, max_batch: int = 4) -> Engine:
    lora = LoraModel(MAKERS[kind](), None)
    pool = AdapterPool(lora, max_loras)
    for name, path in paths.items():
        pool.install(pool.read(name, path, keep=False).result())
    model = lora.get_base_model()
    model.generation_config.eos_token_id = None  # run every request to its max_tokens
    return Engine(lora, Tokenizer(), pool, max_batch=max_batch)


def reference(kind: str, paths, adapter: str, prompt: list[int], n: int) -> list[int]:
    model = MAKERS[kind]()
    if adapter != BASE_ADAPTER:
        model = PeftModel.from_pretrained(model, str(paths[adapter]))
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Collector:
    def __init__(self, n: int) -> None:
        self.text: dict[int, str] = {}
        self.last: dict[int, object] = {}
        self.all_done = threading.Event()
        self.n = n

    def sink(self, i: int):
        def on_event(event):
            self.text[i] = self.text.get(i, "") + event.text
            if event.finish_reason or event.error:
                self.last[i] = event
                if len(self.last) == self.n:
                    self.all_done.set()
        return on_event


def tokens(text: str) -> list[int]:
    return [int(t) for t in text.strip("<>").split("><")] if text else []


def test_mixed_burst_equals_each_request_alone(setup):
    """12 requests over base + 3 adapters, 2 adapter slots, 4 rows: requests join while others
    decode, adapters are evicted and read again; every answer equals generate's alone."""
    kind, paths = setup
    engine = engine_for(kind, paths)
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(12):
        prompt = torch.randint(3, 128, (int(torch.randint(1, 20, (1,), generator=g)),),
                               generator=g).tolist()
        adapter = [BASE_ADAPTER, "a0", "a1", "a2"][i % 4]
        jobs.append((prompt, adapter, 3 + (7 * i) % 11))
    out = Collector(len(jobs))
    engine.start()
    try:
        for i, (prompt, adapter, n) in enumerate(jobs):
            engine.submit(Request(prompt, adapter, Sampling(max_tokens=n, temperature=0),
                                  out.sink(i)))
            if i % 3 == 2:
                time.sleep(0.02)  # later requests arrive while earlier ones decode
        assert out.all_done.wait(120)
    finally:
        engine.stop()
    for i, (prompt, adapter, n) in enumerate(jobs):
        assert out.last[i].error is None, out.last[i].error
        assert out.last[i].finish_reason == "length"
        assert out.last[i].completion_tokens == n
        assert tokens(out.text[i]) == reference(kind, paths, adapter, prompt, n), (i, adapter)
    assert len(engine.adapters.resident) <= 2


def test_cancelled_request_leaves_the_batch_and_others_finish(setup):
    kind, paths = setup
    engine = engine_for(kind, paths, max_batch=2)
    out = Collector(2)
    long = Request([5, 6, 7], "a0", Sampling(max_tokens=200, temperature=0), out.sink(0))
    short = Request([8, 9], "a1", Sampling(max_tokens=6, temperature=0), out.sink(1))
    engine.start()
    try:
        engine.submit(long)
        while len(long.generated) < 3:
            time.sleep(0.005)
        engine.cancel(long)
        engine.submit(short)
        deadline = time.monotonic() + 30
        while 1 not in out.last and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tokens(out.text[1]) == reference(kind, paths, "a1", [8, 9], 6)
        assert len(long.generated) < 200 and 0 not in out.last  # no answer to a gone client
        assert len(engine.batch) == 0 and not engine.adapters.pins
    finally:
        engine.stop()


def test_seeded_sampling_repeats_and_stop_strings_cut(setup):
    kind, paths = setup
    engine = engine_for(kind, paths)
    runs = []
    engine.start()
    try:
        for _ in range(2):
            out = Collector(3)
            for i, adapter in enumerate([BASE_ADAPTER, "a0", "a1"]):
                sampling = Sampling(max_tokens=12, temperature=0.9, top_p=0.8, seed=7)
                engine.submit(Request([4, 5, 6], adapter, sampling, out.sink(i)))
            assert out.all_done.wait(60)
            runs.append(dict(out.text))
        greedy = Collector(1)
        engine.submit(Request([4, 5, 6], BASE_ADAPTER, Sampling(max_tokens=12, temperature=0),
                              greedy.sink(0)))
        assert greedy.all_done.wait(60)
        third = greedy.text[0].split(">")[2] + ">"
        stopped = Collector(1)
        engine.submit(Request([4, 5, 6], BASE_ADAPTER, Sampling(max_tokens=12, temperature=0,
                                                        stop=(third,)), stopped.sink(0)))
        assert stopped.all_done.wait(60)
    finally:
        engine.stop()
    assert runs[0] == runs[1]  # the same seed gives the same tokens, whatever else runs
    assert stopped.last[0].finish_reason == "stop"
    assert stopped.text[0] == greedy.text[0][: greedy.text[0].index(third)]


def test_length_groups_bound_the_padding():
    # 10, 11, 12 padded to 12 add 3 tokens; 100 and 101 add 1; 40 is alone
    assert length_groups([10, 100, 12, 11, 101, 40], slack=4) == [[0, 3, 2], [5], [1, 4]]
    assert length_groups([5, 5, 5], slack=0) == [[0, 1, 2]]
    assert length_groups([5, 6], slack=0) == [[0], [1]]


def test_prompts_admitted_together_in_several_forwards_equal_each_alone(setup):
    """Requests waiting before the loop starts are admitted in one step: prompts of far-apart
    lengths are prefilled in separate forwards and joined into one batch."""
    kind, paths = setup
    engine = engine_for(kind, paths, max_loras=3, max_batch=8)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 40, 4, 25, 41, 2, 60, 26]
    names = [BASE_ADAPTER, "a0", "a1", "a2"]
    jobs = [(torch.randint(3, 128, (n,), generator=g).tolist(), names[i % 4], 4 + i % 3)
            for i, n in enumerate(lengths)]
    assert len(length_groups(lengths, PREFILL_PADDING_SLACK)) > 1
    out = Collector(len(jobs))
    for i, (prompt, adapter, n) in enumerate(jobs):
        engine.submit(Request(prompt, adapter, Sampling(max_tokens=n, temperature=0), out.sink(i)))
    engine.start()
    try:
        assert out.all_done.wait(120)
    finally:
        engine.stop()
    for i, (prompt, adapter, n) in enumerate(jobs):
        assert out.last[i].error is None, out.last[i].error
        assert tokens(out.text[i]) == reference(kind, paths, adapter, prompt, n), (i, adapter)


def record_forwards(engine: Engine) -> list:
    """The engine's prefill forwards (as input shapes) and decoding steps ("step"), in order."""
    log: list = []
    forward, step = engine._forward, engine._decode_step

    def recorded_forward(ids, *args):
        log.append(tuple(ids.shape))
        return forward(ids, *args)

    engine._forward = recorded_forward
    engine._decode_step = lambda: log.append("step") or step()
    return log


def test_prefill_budget_bounds_the_prompt_tokens_of_a_step(setup):
    kind, paths = setup
    engine = engine_for(kind, paths, max_loras=3, max_batch=8)
    engine.prefill_tokens_per_step = 100
    log = record_forwards(engine)
    out = Collector(5)
    # the third 40 waits, the 10 behind it fits; the 150 is prefilled in chunks of the budget;
    # the first request decodes all along, so every forward has a decoding step after it
    for i, n in enumerate([40, 40, 40, 150, 10]):
        sampling = Sampling(max_tokens=30 if i == 0 else 2)
        engine.submit(Request([3 + j % 100 for j in range(n)], BASE_ADAPTER, sampling, out.sink(i)))
    engine.start()
    try:
        assert out.all_done.wait(60)
    finally:
        engine.stop()
    forwards = [e for e in log if e != "step"]
    assert forwards == [(3, 40), (1, 40), (1, 100), (1, 50)], log
    for a, b in zip(log, log[1:]):
        assert a == "step" or b == "step", log  # no two prefill forwards in one step
    assert [out.last[i].error for i in range(5)] == [None] * 5
    assert [out.last[i].completion_tokens for i in range(5)] == [30, 2, 2, 2, 2]


def test_long_prompt_prefilled_in_chunks_equals_it_alone(setup):
    """A prompt longer than the budget goes through the model in chunks, into its own cache,
    while another row decodes; both answers equal generate's alone."""
    kind, paths = setup
    engine = engine_for(kind, paths, max_loras=3)
    engine.prefill_tokens_per_step = 16
    log = record_forwards(engine)
    g = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(3, 128, (50,), generator=g).tolist()
    jobs = [([7, 8, 9], "a0", 12), (long_prompt, "a1", 6)]
    out = Collector(2)
    engine.start()
    try:
        for i, (prompt, adapter, n) in enumerate(jobs):
            engine.submit(Request(prompt, adapter, Sampling(max_tokens=n, temperature=0),
                                  out.sink(i)))
        assert out.all_done.wait(60)
    finally:
        engine.stop()
    for i, (prompt, adapter, n) in enumerate(jobs):
        assert out.last[i].error is None, out.last[i].error
        assert out.last[i].prompt_tokens == len(prompt)
        assert tokens(out.text[i]) == reference(kind, paths, adapter, prompt, n), (i, adapter)
    assert [e for e in log if e != "step"][-4:] == [(1, 16), (1, 16), (1, 16), (1, 2)], log
    assert not engine.adapters.pins and engine.partial is None


def test_cancelled_during_chunked_prefill_frees_its_row_and_adapter(setup):
    kind, paths = setup
    engine = engine_for(kind, paths, max_batch=2)
    engine.prefill_tokens_per_step = 4
    out = Collector(2)
    long = Request(list(range(3, 83)), "a0", Sampling(max_tokens=5), out.sink(0))
    short = Request([8, 9], "a1", Sampling(max_tokens=6, temperature=0), out.sink(1))
    chunk = engine._prefill_chunk

    def cancel_after_two(budget):  # the client goes away after two chunks
        if long.prefilled == 8:
            engine.cancel(long)
        return chunk(budget)

    engine._prefill_chunk = cancel_after_two
    engine.submit(long)
    engine.submit(short)
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while 1 not in out.last and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tokens(out.text[1]) == reference(kind, paths, "a1", [8, 9], 6)
        assert long.prefilled == 8 and 0 not in out.last  # no answer to a gone client
        assert engine.partial is None and not engine.adapters.pins and engine.busy == 0
    finally:
        engine.stop()
