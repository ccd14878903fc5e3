"""GET /metrics of `lorakit serve`, read with prometheus_client's own parser from a live server
after a known load: requests by adapter and HTTP status, finish reasons, token counters equal to
the usage the API returned, histogram counts equal to requests and tokens, the adapter cache
(one slot, two adapters: loads, evictions, hits and misses follow from the order of requests),
gauges at rest, and the API key. Without prometheus_client the server still serves, and
/metrics says what to install.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest
from serve_util import ServerProcess, wait_until, write_adapters

pytestmark = pytest.mark.default_model  # the tiny chat model borrows SmolLM2's tokenizer

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory, smol_tokenizer):
    """Two adapters and one slot: a0 is installed, then evicted by a1, at start."""
    adapters = write_adapters(tmp_path_factory.mktemp("metrics-adapters"), len(smol_tokenizer), 2)
    s = ServerProcess("--model", str(tiny_chat_dir), "--dtype", "float32", "--api-key", KEY,
                      "--adapter", f"a0={adapters['a0']}", "--adapter", f"a1={adapters['a1']}",
                      "--max-loras", "1", "--max-batch", "4", "--max-tokens-limit", "240")
    yield s
    assert s.stop() == 0, s.output[-2000:]


def scrape(server, headers=AUTH) -> tuple[int, dict, str]:
    """(status, {metric family name: family}, content type) of GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(server.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            return r.status, families, r.headers["content-type"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers["content-type"]


def values(families, name: str, suffix: str = "", **match) -> dict[tuple, float]:
    """The samples `name + suffix` whose labels include `match`, keyed by their other labels
    (adapter first, when there is one)."""
    out = {}
    for s in families[name].samples:
        if s.name == name + suffix and match.items() <= s.labels.items():
            rest = {k: v for k, v in s.labels.items() if k not in match and k != "model_name"}
            key = (rest.pop("adapter"),) if "adapter" in rest else ()
            out[key + tuple(v for k, v in sorted(rest.items()) if k != "le")] = s.value
    return out


def by_adapter(families, name: str, suffix: str = "", **match) -> dict[str, float]:
    found = Counter()
    for key, value in values(families, name, suffix, **match).items():
        found[key[0]] += value
    return {k: v for k, v in found.items() if v}


def test_metrics_after_a_known_load(server):
    client = server.client(api_key=KEY)
    base = next(m.id for m in client.models.list().data if m.parent is None)
    usage: dict[str, list] = {"": [], "a0": [], "a1": []}  # (prompt, completion, finish) each
    reasons: Counter = Counter()

    def answered(adapter, answer):
        usage[adapter].append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
        reasons[adapter, answer.choices[0].finish_reason] += 1

    # one slot: a1 is resident; a1 hits, a0 misses (evicts a1), a0 hits, a1 misses (evicts a0)
    answered("", client.completions.create(model=base, prompt="The sky is", max_tokens=7,
                                           temperature=0))
    answered("a1", client.chat.completions.create(model="a1", messages=CHAT, max_tokens=9,
                                                  temperature=0))
    answered("a0", client.completions.create(model="a0", prompt="Once", max_tokens=5,
                                             temperature=0))
    chunks = list(client.completions.create(model="a0", prompt="Hello there", max_tokens=11,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    u = chunks[-1].usage
    usage["a0"].append((u.prompt_tokens, u.completion_tokens))
    reasons["a0", next(c.choices[0].finish_reason for c in chunks
                       if c.choices and c.choices[0].finish_reason)] += 1
    answered("a1", client.completions.create(model="a1", prompt="Go", max_tokens=1,
                                             temperature=0))
    answered("", client.completions.create(model=base, prompt="A", max_tokens=3, temperature=0.7,
                                           seed=1))
    # errors: over --max-tokens-limit (a known adapter), an unknown model, no key
    bad = [({"model": "a0", "prompt": "x", "max_tokens": 999}, AUTH, 400, "a0"),
           ({"model": "nope", "prompt": "x"}, AUTH, 404, "<unknown>"),
           ({"model": base, "prompt": "x"}, {}, 401, "<unknown>")]
    for body, headers, status, _ in bad:
        assert post(server, body, headers) == status

    code, families, content_type = scrape(server)
    assert code == 200 and content_type.startswith("text/plain")
    # vLLM's model_name: the served base model's name, on every series
    assert {s.labels.get("model_name") for name, f in families.items() for s in f.samples
            if name != "lorakit:lora_requests_info"} == {base}
    check_requests(families, usage, reasons, bad)
    check_tokens_and_histograms(families, usage)
    check_adapter_cache(families)
    check_gauges_at_rest(families)


def post(server, body: dict, headers: dict) -> int:
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check_requests(families, usage, reasons, bad):
    statuses = Counter({(a, "200"): len(u) for a, u in usage.items()})
    statuses.update((adapter, str(status)) for *_, status, adapter in bad)
    assert values(families, "lorakit:requests", "_total") == statuses
    assert values(families, "lorakit:request_success", "_total") == reasons


def check_tokens_and_histograms(families, usage):
    served = {a: u for a, u in usage.items() if u}
    prompt = {a: sum(p for p, _ in u) for a, u in served.items()}
    completion = {a: sum(c for _, c in u) for a, u in served.items()}
    assert by_adapter(families, "lorakit:prompt_tokens", "_total") == prompt
    assert by_adapter(families, "lorakit:generation_tokens", "_total") == completion
    requests = {a: len(u) for a, u in served.items()}
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert by_adapter(families, f"lorakit:{name}", "_count") == requests, name
    # one observation per token after the first, under vLLM's new and old names
    gaps = {a: sum(c - 1 for _, c in u if c) for a, u in served.items()}
    gaps = {a: n for a, n in gaps.items() if n}
    for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert by_adapter(families, f"lorakit:{name}", "_count") == gaps, name
    several = {a: sum(c > 1 for _, c in u) for a, u in served.items()}
    assert by_adapter(families, "lorakit:request_time_per_output_token_seconds", "_count") == {
        a: n for a, n in several.items() if n}
    ttft = by_adapter(families, "lorakit:time_to_first_token_seconds", "_sum")
    e2e = by_adapter(families, "lorakit:e2e_request_latency_seconds", "_sum")
    assert all(0 < ttft[a] <= e2e[a] for a in requests)
    # the +Inf bucket holds every observation
    inf = by_adapter(families, "lorakit:time_to_first_token_seconds", "_bucket", le="+Inf")
    assert inf == requests
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)


def check_adapter_cache(families):
    # at start: a0 loaded, then evicted by a1; then a0 (miss: evicts a1), a1 (miss: evicts a0)
    assert by_adapter(families, "lorakit:adapter_loads", "_total") == {"a0": 2, "a1": 2}
    assert by_adapter(families, "lorakit:adapter_evictions", "_total") == {"a0": 2, "a1": 1}
    assert by_adapter(families, "lorakit:adapter_cache_hits", "_total") == {"a0": 1, "a1": 1}
    assert by_adapter(families, "lorakit:adapter_cache_misses", "_total") == {"a0": 1, "a1": 1}


def check_gauges_at_rest(families):
    def gauge(name):
        (sample,) = families[f"lorakit:{name}"].samples
        return sample.value

    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_rows",
                 "kv_cache_usage_perc"):
        assert gauge(name) == 0, name
    assert gauge("num_adapters_resident") == 1
    (info,) = families["lorakit:lora_requests_info"].samples
    assert info.labels == {"max_lora": "1", "running_lora_adapters": "",
                           "waiting_lora_adapters": ""}
    assert info.value > 1e9  # the time of the scrape, as vLLM's


def test_metrics_need_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        code, body, _ = scrape(server, headers)
        assert code == 401 and body["error"]["code"] == "invalid_api_key"


def test_a_client_that_goes_away_is_counted_as_abort(server):
    """A stream dropped after its first tokens ends as `abort`, and its row is freed."""
    _, before, _ = scrape(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "a1", "prompt": "Go", "max_tokens": 240, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first event
    conn.sock.close()
    conn.close()

    def running():
        return scrape(server)[1]["lorakit:num_requests_running"].samples[0].value

    assert wait_until(lambda: running() == 0, timeout=30)
    _, after, _ = scrape(server)
    ended = Counter(values(after, "lorakit:request_success", "_total", adapter="a1"))
    ended.subtract(values(before, "lorakit:request_success", "_total", adapter="a1"))
    tokens = (by_adapter(after, "lorakit:generation_tokens", "_total")["a1"]
              - by_adapter(before, "lorakit:generation_tokens", "_total")["a1"])
    assert +ended == {("abort",): 1} and 0 < tokens < 240


def test_without_prometheus_client_the_server_serves_and_metrics_says_what_to_install(
        monkeypatch, capsys):
    from starlette.requests import Request

    from lorakit.serving.server import Server, ServeConfig

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    server = Server(SimpleNamespace(tokenizer=None), ServeConfig(("m",)), 64)
    assert server.metrics is None
    assert "pip install 'lorakit[metrics]'" in capsys.readouterr().out
    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    response = asyncio.run(server.prometheus_metrics(Request(scope)))
    assert response.status_code == 501
    assert "pip install 'lorakit[metrics]'" in json.loads(response.body)["error"]["message"]


def test_importing_the_server_does_not_import_prometheus_client():
    code = ("import sys, lorakit.serving.server, lorakit.cli; "
            "sys.exit('prometheus_client' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
