"""`lorakit serve` as users run it: a fresh server process on a free loopback port, talked to
with the official `openai` client (and raw HTTP for what a client would never send).

Error statuses for malformed requests are in tests/reliability/test_server_faults.py (the
fault suite's server part). References: `lorakit generate` in its own process (greedy answers must be equal, token for
token), and the same request sent alone (answers inside a concurrent burst must not change).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest
from serve_util import ServerProcess, wait_until, write_adapters

pytestmark = pytest.mark.default_model  # the tiny chat model borrows SmolLM2's tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smol_tokenizer):
    return write_adapters(tmp_path_factory.mktemp("serve-adapters"), len(smol_tokenizer))


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory, smol_tokenizer):
    """An adapter trained on a model with wider attention heads than the served one."""
    root = tmp_path_factory.mktemp("other-base")
    return write_adapters(root, len(smol_tokenizer), n=1, head_dim=16)["a0"]


@pytest.fixture(scope="module")
def server(tiny_chat_dir, adapters):
    """Two adapters at start, two slots: a third adapter loaded later evicts one. fp32, so that
    references in other processes compute the same numbers ("auto" may pick bf16). A prefill
    budget of 8 tokens: chat prompts are prefilled in chunks, between decoding steps."""
    s = ServerProcess("--model", str(tiny_chat_dir), "--dtype", "float32",
                      "--adapter", f"a0={adapters['a0']}",
                      "--adapter", f"a1={adapters['a1']}", "--max-loras", "2",
                      "--max-batch", "6", "--max-tokens-limit", "200",
                      "--max-prefill-tokens", "8")
    yield s
    assert s.stop() == 0, s.output[-2000:]


def lorakit_generate(model, prompt: str, adapter=None, chat=False, n=12) -> str:
    cmd = [sys.executable, "-m", "lorakit", "generate", "--model", str(model),
           "--dtype", "float32", "--max-new-tokens", str(n), prompt]
    cmd += ["--adapter", str(adapter)] if adapter else []
    cmd += ["--chat"] if chat else []
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout[:-1]  # print() added one newline


def http(server, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, JSON body, headers) of a raw request."""
    req = urllib.request.Request(server.url + path, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_greedy_answers_equal_lorakit_generate(server, tiny_chat_dir, adapters):
    client = server.client()
    for name, path in [(server_base(client), None), ("a0", adapters["a0"])]:
        chat = client.chat.completions.create(model=name, messages=CHAT, max_tokens=12,
                                              temperature=0)
        assert chat.choices[0].message.content.strip() == lorakit_generate(
            tiny_chat_dir, CHAT[0]["content"], path, chat=True)
        text = client.completions.create(model=name, prompt="The sky is", max_tokens=12,
                                         temperature=0)
        assert text.choices[0].text == lorakit_generate(tiny_chat_dir, "The sky is", path)
        assert text.choices[0].finish_reason in ("length", "stop")
        assert text.usage.prompt_tokens > 0
        assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens


def server_base(client) -> str:
    return next(m.id for m in client.models.list().data if m.parent is None)


def test_models_lists_base_and_adapters_with_parent(server, adapters):
    models = {m.id: m for m in server.client().models.list().data}
    base = server_base(server.client())
    assert {"a0", "a1"} <= set(models) and models["a0"].parent == base
    assert models[base].parent is None
    assert models["a1"].model_extra["root"] == str(adapters["a1"])


def test_streaming_equals_whole_answer_and_reports_usage(server, smol_tokenizer):
    client = server.client()
    whole = client.chat.completions.create(model="a1", messages=CHAT, max_tokens=20,
                                           temperature=0)
    stream = client.chat.completions.create(model="a1", messages=CHAT, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = smol_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chunks[-1].usage.prompt_tokens == len(
        smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    plain = list(client.completions.create(model="a0", prompt="Once", max_tokens=9,
                                           temperature=0, stream=True))
    alone = client.completions.create(model="a0", prompt="Once", max_tokens=9, temperature=0)
    assert "".join(c.choices[0].text for c in plain) == alone.choices[0].text


def test_concurrent_burst_with_per_request_adapters(server, adapters):
    """18 requests at once over the base and three adapters (two slots): each answer equals
    the same request sent alone, and the third adapter (loaded at run time) takes turns."""
    client = server.client()
    client.post("/load_lora_adapter", cast_to=str,
                body={"lora_name": "a2", "lora_path": str(adapters["a2"])})
    base = server_base(client)
    jobs = [(m, f"Count to {i}", 4 + 3 * i) for i, m in
            enumerate([base, "a0", "a1", "a2"] * 4 + ["a2", "a0"])]

    def ask(model, prompt, n):
        r = client.chat.completions.create(model=model, max_tokens=n, temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
        return r.choices[0].message.content

    alone = [ask(*job) for job in jobs]
    together: list = [None] * len(jobs)

    def worker(i):
        together[i] = ask(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    assert len(set(alone[:4])) > 1  # the adapters change the answers


def test_load_unload_and_eviction_while_a_request_decodes(server, adapters, other_base_adapter):
    client = server.client()
    expected = client.completions.create(model="a0", prompt="Long", max_tokens=150,
                                         temperature=0).choices[0].text
    got = {}

    def long_stream():
        parts = client.completions.create(model="a0", prompt="Long", max_tokens=150,
                                          temperature=0, stream=True)
        got["text"] = "".join(c.choices[0].text for c in parts)

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        # reload a1 (evicted or not), then a2: with a0 pinned, one of them is evicted each time
        for name in ("a1", "a2", "a1"):
            client.completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0)
        with pytest.raises(openai.BadRequestError, match="another base model"):
            client.post("/load_lora_adapter", cast_to=str,
                        body={"lora_name": "bad", "lora_path": str(other_base_adapter)})
        with pytest.raises(openai.NotFoundError):
            client.post("/load_lora_adapter", cast_to=str,
                        body={"lora_name": "gone", "lora_path": "/nonexistent/adapter"})
        with pytest.raises(openai.BadRequestError, match="already been loaded"):
            client.post("/load_lora_adapter", cast_to=str,
                        body={"lora_name": "a0", "lora_path": str(adapters["a0"])})
        client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "a1"})
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="a1", prompt="Hi", max_tokens=3)
        with pytest.raises(openai.NotFoundError):
            client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "a1"})
        assert "bad" not in {m.id for m in client.models.list().data}
    finally:
        t.join(300)
    assert got["text"] == expected  # the running request never noticed
    client.post("/load_lora_adapter", cast_to=str,
                body={"lora_name": "a1", "lora_path": str(adapters["a1"])})


def test_api_key_and_full_queue(tiny_chat_dir, adapters):
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={adapters['a0']}",
                      "--api-key", "s3cret", "--max-batch", "1", "--max-waiting", "1")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            code, answer, _ = http(s, "/v1/models", headers=headers)
            assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        assert http(s, "/health")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        client = s.client(api_key="s3cret")
        assert client.models.list().data
        statuses = []

        def ask():
            try:
                client.completions.create(model="a0", prompt="x", max_tokens=60)
                statuses.append(200)
            except openai.RateLimitError as e:
                statuses.append(429)
                assert e.response.headers["retry-after"]

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert 200 in statuses and 429 in statuses, statuses
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_decoding_requests_then_exits_0(tiny_chat_dir, adapters):
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={adapters['a0']}",
                      "--grace", "30")
    client = s.client()
    # the whole answer, asked before the signal (it may end early at an end-of-text token)
    whole = client.completions.create(model="a0", prompt="Go", max_tokens=120, temperature=0)
    assert whole.usage.completion_tokens > 10
    stream = client.completions.create(model="a0", prompt="Go", max_tokens=120, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            s.proc.send_signal(signal.SIGTERM)
    # the request finished completely: the same text, tokens and finish reason
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason
    assert s.proc.wait(60) == 0
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_client_that_disconnects_frees_its_row(server):
    client = server.client()
    stream = client.completions.create(model="a1", prompt="Go", max_tokens=200, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert wait_until(lambda: http(server, "/health")[1]["running"] == 0, timeout=20)


@pytest.mark.parametrize("flags", [["--quantization", "nf4"], ["--dtype", "bfloat16"]])
def test_quantized_and_bf16_bases_serve_like_generate(flags, tiny_chat_dir, adapters):
    import torch

    from lorakit.base import load_model
    from lorakit.lora import LoraModel
    from lorakit.inference.generate import generate_texts

    kw = {"quantization": "nf4"} if "nf4" in flags else {"dtype": "bfloat16"}
    model, tok = load_model(str(tiny_chat_dir), **kw)
    lora = LoraModel.from_pretrained(model, adapters["a0"])
    torch.manual_seed(0)
    # on a bf16 compute dtype the server computes large adapter products in bf16 (as vLLM
    # does): the reference is transformers' generate through the same mixed-adapter path
    with lora.mixed_adapter_batch(["default"]):
        expected = generate_texts(lora, tok, [CHAT], max_new_tokens=10)[0]
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={adapters['a0']}", *flags)
    try:
        got = s.client().chat.completions.create(model="a0", messages=CHAT, max_tokens=10,
                                                 temperature=0)
        assert got.choices[0].message.content == expected
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_embedded_model_serves_like_generate():
    """No --model: the embedded SmolLM2-135M-Instruct, under its own name."""
    s = ServerProcess()
    try:
        client = s.client()
        assert server_base(client) == "SmolLM2-135M-Instruct"
        got = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT,
                                             max_tokens=16, temperature=0)
        expected = lorakit_generate_default(CHAT[0]["content"])
        assert got.choices[0].message.content.strip() == expected
    finally:
        assert s.stop() == 0


def lorakit_generate_default(prompt: str) -> str:
    res = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--chat",
                          "--max-new-tokens", "16", prompt],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout[:-1]


def test_adapter_saved_by_peft_answers_as_peft_generates(server, tiny_chat_dir, tmp_path,
                                                         smol_tokenizer):
    """Loaded at run time from a directory PEFT wrote; the reference is PEFT's own generate."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_dir),
                                PeftLoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                               target_modules=["q_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.mul_(6)
    peft_model.save_pretrained(tmp_path / "peft")
    client = server.client()
    client.post("/load_lora_adapter", cast_to=str,
                body={"lora_name": "peft", "lora_path": str(tmp_path / "peft")})
    ids = smol_tokenizer("Tell me", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = peft_model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=10, do_sample=False)
    expected = smol_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = client.completions.create(model="peft", prompt="Tell me", max_tokens=10, temperature=0)
    assert got.choices[0].text == expected
    base = server_base(client)
    assert client.completions.create(model=base, prompt="Tell me", max_tokens=10,
                                     temperature=0).choices[0].text != expected
    client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "peft"})
