"""Faults a server meets: clients that go away mid-stream, bursts beyond its queue, an adapter
whose files break after it was registered, SIGTERM under load, paths that try to leave
`--adapter-root`. Each request must get exactly one complete answer or one error (none lost,
none answered twice), the server's memory must stay flat, and it must keep serving. And the
server's bad-input table: each malformed request gets OpenAI's error body with its status.
Every case is recorded for tests/RELIABILITY.md ("server faults", "server bad input").
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import threading
import time

import pytest
import torch
from harness import record
from serve_util import ServerProcess, rss_kb, wait_until, write_adapters

pytestmark = pytest.mark.default_model  # the tiny chat model borrows SmolLM2's tokenizer


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smol_tokenizer):
    return write_adapters(tmp_path_factory.mktemp("fault-adapters"), len(smol_tokenizer), n=2)


def raw_request(port: int, body: dict, path: str = "/v1/completions", read_chunks: int = -1):
    """(status, headers, list of SSE data payloads or the JSON body). With `read_chunks` >= 0
    on a stream, the connection is dropped after that many events (a client going away)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if not body.get("stream") or resp.status != 200:
        data = json.loads(resp.read())
        conn.close()
        return resp.status, resp.headers, data
    events = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line[6:])
            if len(events) == read_chunks:
                conn.sock.close()  # go away without reading the rest
                conn.close()
                return resp.status, resp.headers, events
    conn.close()
    return resp.status, resp.headers, events


def test_disconnects_and_bursts_lose_nothing_and_memory_stays_flat(tiny_chat_dir, adapters):
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={adapters['a0']}",
                      "--adapter", f"a1={adapters['a1']}", "--max-batch", "3",
                      "--max-waiting", "4")
    try:
        expected = {m: raw_request(s.port, {"model": m, "prompt": "Go", "max_tokens": 24,
                                            "temperature": 0})[2]["choices"][0]["text"]
                    for m in ("a0", "a1")}
        outcomes: list[tuple[str, object]] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            model = ("a0", "a1")[i % 2]
            body = {"model": model, "prompt": "Go", "max_tokens": 24, "temperature": 0}
            if i % 3 == 0:  # a client that goes away after two events
                status, _, events = raw_request(s.port, {**body, "max_tokens": 200,
                                                         "stream": True}, read_chunks=2)
                result = ("gone", status)
            elif i % 3 == 1:  # a whole streamed answer
                status, headers, events = raw_request(s.port, {**body, "stream": True})
                if status == 200:
                    chunks = [json.loads(e) for e in events if e != "[DONE]"]
                    text = "".join(c["choices"][0]["text"] for c in chunks)
                    finished = [c for c in chunks if c["choices"][0]["finish_reason"]]
                    ok = events[-1] == "[DONE]" and len(finished) == 1 and text == expected[model]
                    result = ("stream", ok)
                else:
                    result = ("refused", (status, headers.get("Retry-After")))
            else:
                status, headers, data = raw_request(s.port, body)
                if status == 200:
                    result = ("whole", data["choices"][0]["text"] == expected[model])
                else:
                    result = ("refused", (status, headers.get("Retry-After")))
            with lock:
                outcomes.append(result)

        rss = []
        for _ in range(4):  # rounds of 15 concurrent clients: beyond 3 rows + 4 waiting
            threads = [threading.Thread(target=client, args=(i,)) for i in range(15)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert wait_until(lambda: health(s)["running"] == 0 and health(s)["waiting"] == 0)
            rss.append(rss_kb(s.proc.pid))
        for kind in ("gone", "stream", "whole", "refused"):
            of_kind = [v for k, v in outcomes if k == kind]
            if kind in ("stream", "whole"):
                bad = sum(not ok for ok in of_kind)
            elif kind == "refused":
                bad = sum(not (st == 429 and retry) for st, retry in of_kind)
            else:
                bad = 0
            record("server faults", f"burst client: {kind}", f"{len(of_kind)} requests, "
                   f"{bad} not as expected", bad == 0, trials=len(of_kind), lost=bad)
        record("server faults", "RSS over 4 rounds of 15 clients",
               f"{(rss[-1] - rss[0]) / 1024:+.1f} MiB after round 1", rss[-1] - rss[0] < 40_000)
        assert len(outcomes) == 60  # every client got an outcome
        assert all(ok for kind, ok in outcomes if kind in ("stream", "whole")), outcomes
        refused = [v for kind, v in outcomes if kind == "refused"]
        assert all(status == 429 and retry for status, retry in refused), refused
        assert refused and sum(kind in ("stream", "whole") for kind, _ in outcomes) >= 8
        assert rss[-1] - rss[0] < 40_000, rss  # kB: flat after the first round
        assert raw_request(s.port, {"model": "a0", "prompt": "Go", "max_tokens": 24,
                                    "temperature": 0})[2]["choices"][0]["text"] == expected["a0"]
    finally:
        assert s.stop() == 0


def health(s) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("GET", "/health")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def test_adapter_that_fails_to_reload_answers_an_error_and_the_server_goes_on(
        tiny_chat_dir, adapters, tmp_path):
    """One slot: a0 leaves when a1 is used; a0's file is then truncated on disk. The next a0
    request gets the load error (400), and a1 and the base still answer."""
    a0 = tmp_path / "a0"
    shutil.copytree(adapters["a0"], a0)
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={a0}",
                      "--adapter", f"a1={adapters['a1']}", "--max-loras", "1")
    try:
        body = {"prompt": "Go", "max_tokens": 5, "temperature": 0}
        assert raw_request(s.port, {**body, "model": "a1"})[0] == 200  # a0 evicted
        weights = a0 / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        status, _, data = raw_request(s.port, {**body, "model": "a0"})
        ok = status == 400 and "adapter_model.safetensors" in data["error"]["message"]
        record("server faults", "adapter file truncated after eviction", f"{status}", ok)
        assert ok, data
        assert raw_request(s.port, {**body, "model": "a1"})[0] == 200
        models = json.loads(_get(s, "/v1/models"))["data"]
        base = next(m["id"] for m in models if m["parent"] is None)
        assert raw_request(s.port, {**body, "model": base})[0] == 200
    finally:
        assert s.stop() == 0


def _get(s, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory, smol_tokenizer):
    """tiny_chat_dir's model with room for 2048 positions and no end of its own: greedy
    decoding on the random model had emitted its end-of-sequence token after ~104 tokens, so
    whether a "long" stream outlasted the grace period depended on when SIGTERM came. The
    end-of-sequence rows of lm_head are zeroed: that logit is 0, never the argmax over
    49 152 random logits whose largest is a few standard deviations above 0. (The adapters
    fit this model: same shapes, and they leave lm_head alone.)"""
    from conftest import save_tiny_chat_model, tiny_chat_model
    model = tiny_chat_model(smol_tokenizer, max_position_embeddings=2048)
    ends = [smol_tokenizer.eos_token_id, model.config.eos_token_id,
            model.generation_config.eos_token_id]
    ends = sorted({i for e in ends if e is not None for i in (e if isinstance(e, list) else [e])})
    with torch.no_grad():
        model.lm_head.weight[ends] = 0
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-endless"), smol_tokenizer, model)


def test_sigterm_under_load_answers_every_request_once(endless_model_dir, adapters):
    """8 streams running, SIGTERM with a 0.2 s grace period: each stream ends once, with its
    answer or with an error event (never a silent cut); the long ones (1000 tokens, seconds
    of decoding) are told; exit status 0. Finishing within a long grace period is
    tests/test_serve.py's SIGTERM test."""
    s = ServerProcess("--model", str(endless_model_dir), "--adapter", f"a0={adapters['a0']}",
                      "--max-batch", "8", "--grace", "0.2")
    results: list = [None] * 8

    def client(i: int) -> None:
        n = 20 if i % 2 else 1000  # short ones may finish, long ones outlast the grace
        status, _, events = raw_request(s.port, {"model": "a0", "prompt": "Go", "stream": True,
                                                 "max_tokens": n, "temperature": 0})
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        errors = [c for c in chunks if "error" in c]
        finished = [c for c in chunks if "choices" in c and c["choices"][0]["finish_reason"]]
        results[i] = (status, events[-1] == "[DONE]", len(finished), len(errors))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    assert wait_until(lambda: health(s)["running"] == 8, timeout=60)
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    status = s.proc.wait(60)
    ended = [r for r in results if r and r[0] == 200 and r[1] and r[2] + r[3] == 1]
    record("server faults", "SIGTERM with 8 streams running (grace 0.2 s)",
           f"exit {status}; {sum(r[2] for r in ended)} finished, {sum(r[3] for r in ended)} "
           "told by an error event", status == 0 and len(ended) == 8, trials=8,
           lost=8 - len(ended))
    assert status == 0
    assert time.monotonic() - started < 10
    for i, (status, done, finished, errors) in enumerate(results):
        assert status == 200 and done, results
        assert finished + errors == 1, results  # one ending each: an answer or an error
        if i % 2 == 0:
            assert errors == 1, results  # a long one was told


def test_runtime_loads_stay_inside_adapter_root(tiny_chat_dir, adapters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(adapters["a0"], root / "ok")
    (root / "link").symlink_to(adapters["a1"], target_is_directory=True)  # points outside
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter-root", str(root))
    try:
        for name, path, status in [("ok", "ok", 200), ("up", "../x", 400),
                                   ("abs", str(adapters["a1"]), 400), ("link", "link", 400),
                                   ("../evil", "ok", 400), ("a/b", "ok", 400)]:
            code = _post_status(s, "/v1/load_lora_adapter",
                                {"lora_name": name, "lora_path": path})
            record("server bad input", f"load_lora_adapter {name}={path} (--adapter-root)",
                   str(code), code == status)
            assert code == status, (name, path, code)
    finally:
        assert s.stop() == 0


def _post_status(s, path: str, body: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_malformed_requests_get_openai_errors_with_their_status(tiny_chat_dir, adapters):
    s = ServerProcess("--model", str(tiny_chat_dir), "--adapter", f"a0={adapters['a0']}",
                      "--max-tokens-limit", "200")
    ok = {"model": "a0", "prompt": "hi", "max_tokens": 2}
    chat = {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [  # (what, path, body bytes, status)
        ("not JSON", "/v1/completions", b"{not json", 400),
        ("not UTF-8", "/v1/completions", b"{\"model\": \"\xff\"}", 400),
        ("JSON array, not object", "/v1/completions", b"[1, 2]", 422),
        ("temperature a string", "/v1/completions", _j({**ok, "temperature": "hot"}), 422),
        ("max_tokens a float", "/v1/completions", _j({**ok, "max_tokens": 2.5}), 422),
        ("stream a string", "/v1/completions", _j({**ok, "stream": "yes"}), 422),
        ("prompt missing", "/v1/completions", _j({"model": "a0"}), 422),
        ("model missing", "/v1/completions", _j({"prompt": "hi"}), 422),
        ("unknown field", "/v1/completions", _j({**ok, "top_k": 3}), 400),
        ("unknown model", "/v1/completions", _j({**ok, "model": "nope"}), 404),
        ("max_tokens over the limit", "/v1/completions", _j({**ok, "max_tokens": 201}), 400),
        ("max_tokens 0", "/v1/completions", _j({**ok, "max_tokens": 0}), 400),
        ("temperature 3", "/v1/completions", _j({**ok, "temperature": 3}), 400),
        ("top_p 0", "/v1/completions", _j({**ok, "top_p": 0}), 400),
        ("n 2", "/v1/completions", _j({**ok, "n": 2}), 400),
        ("5 stop strings", "/v1/completions", _j({**ok, "stop": list("abcde")}), 400),
        ("logprobs asked", "/v1/completions", _j({**ok, "logprobs": 2}), 400),
        ("token id out of vocabulary", "/v1/completions", _j({**ok, "prompt": [10 ** 9]}), 400),
        ("empty prompt", "/v1/completions", _j({**ok, "prompt": ""}), 400),
        ("prompt longer than the context", "/v1/completions",
         _j({**ok, "prompt": "word " * 400}), 413),
        ("prompt + max_tokens over the context", "/v1/completions",
         _j({**ok, "prompt": "word " * 200, "max_tokens": 150}), 400),
        ("body over 4 MiB", "/v1/completions", b"[" + b"1," * (3 << 20) + b"1]", 413),
        ("messages a string", "/v1/chat/completions", _j({**chat, "messages": "hi"}), 422),
        ("messages empty", "/v1/chat/completions", _j({**chat, "messages": []}), 400),
        ("message without role", "/v1/chat/completions",
         _j({**chat, "messages": [{"content": "hi"}]}), 422),
        ("image content part", "/v1/chat/completions",
         _j({**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400),
        ("unknown endpoint", "/v1/embeddings", _j(ok), 404),
        ("load without lora_path", "/v1/load_lora_adapter", _j({"lora_name": "x"}), 422),
        ("unload of an unknown adapter", "/v1/unload_lora_adapter", _j({"lora_name": "x"}), 404),
    ]
    try:
        for what, path, body, status in cases:
            code, answer, _ = _post(s, path, body)
            shaped = isinstance(answer, dict) and set(answer.get("error", {})) == {
                "message", "type", "param", "code"} and bool(answer["error"]["message"])
            record("server bad input", what, str(code), code == status and shaped)
            assert code == status and shaped, (what, code, answer)
        assert _post(s, "/v1/completions", _j(ok))[0] == 200  # and it keeps serving
    finally:
        assert s.stop() == 0


def _j(body) -> bytes:
    return json.dumps(body).encode()


def _post(s, path: str, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(raw), resp.headers
    except ValueError:
        return resp.status, raw, resp.headers
