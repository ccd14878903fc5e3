"""Security: no pickle or code execution by default, no network unless asked, no writes or
reads outside the directories a user names.

- The package source is scanned (ast, not grep) for torch.load, pickle and friends, eval/exec,
  unsafe YAML, and trust_remote_code=True; every use must be on the allow-list, which says why
  it is safe, and the allow-list must not name a use that is gone.
- The demo runs end to end with sockets blocked (HF_HUB_OFFLINE unset) and makes no attempt to
  reach the network.
- Adapter and checkpoint names cannot leave their directory: '..', absolute paths and symbolic
  links out of the tree are refused or never followed.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, write_sum_rows
from harness import REPO, record

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.atomic import atomic_directory
from lorakit.errors import ConfigError
from lorakit.lora.files import AdapterFileError, adapter_dir, read_adapter_weights
from lorakit.training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

PACKAGE = REPO / "lorakit"

# (file, construct) -> why that use is safe. Constructs: "torch.load", "pickle", "eval",
# "exec", "compile", "yaml.load", "trust_remote_code=True", "numpy.load(allow_pickle)",
# "marshal", "dill", "joblib", "shell=True".
ALLOWED = {
    ("lorakit/lora/files.py", "torch.load"):
        "old PEFT adapter_model.bin: read only when the caller passes allow_pickle=True "
        "(CLI --allow-pickle), and with weights_only=True (checked below)",
    ("lorakit/lora/files.py", "pickle"):
        "only pickle.UnpicklingError, to report a refused .bin in one line",
}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for an attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, where: str) -> list[tuple[str, str, int, str]]:
    """(file, construct, line, detail) of every risky use in `source`."""
    tree = ast.parse(source)
    found = []

    def add(construct: str, node: ast.AST, detail: str = "") -> None:
        found.append((where, construct, node.lineno, detail))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    add(a.name.split(".")[0], node, "import")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                add(node.module.split(".")[0], node, "from-import")
            for a in node.names:
                if a.name in ("load", "loads") and (node.module or "") in ("torch", "yaml"):
                    add(f"{node.module}.load", node, f"from {node.module} import {a.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "compile", "__import__"):
                add("eval" if name == "__import__" else name, node, name)
            elif name.endswith("torch.load"):
                weights_only = _kw(node, "weights_only")
                add("torch.load", node, "weights_only=True" if _is_true(weights_only)
                    else "WITHOUT weights_only=True")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                add("yaml.load", node, name)
            elif name.endswith("numpy.load") or name in ("np.load",):
                if _is_true(_kw(node, "allow_pickle")):
                    add("numpy.load(allow_pickle)", node)
            if _is_true(_kw(node, "trust_remote_code")):
                add("trust_remote_code=True", node, name)
            if _is_true(_kw(node, "shell")):
                add("shell=True", node, name)
        elif isinstance(node, ast.arguments):  # def f(trust_remote_code=True)
            args = node.posonlyargs + node.args
            pairs = list(zip(args[len(args) - len(node.defaults):], node.defaults))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            for a, default in pairs:
                if a.arg == "trust_remote_code" and _is_true(default):
                    add("trust_remote_code=True", default, "a default")
        elif isinstance(node, ast.Attribute) and _dotted(node).split(".")[0] in UNSAFE_MODULES:
            add(_dotted(node).split(".")[0], node, _dotted(node))
        elif isinstance(node, ast.Dict):  # {"trust_remote_code": True} passed on as **kwargs
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v):
                    add("trust_remote_code=True", node, "in a dict")
    return found


def package_findings() -> list[tuple[str, str, int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out += findings(path.read_text(), str(path.relative_to(REPO)))
    return out


def test_no_unguarded_pickle_eval_or_remote_code():
    found = package_findings()
    unguarded = [f for f in found if (f[0], f[1]) not in ALLOWED]
    unsafe_load = [f for f in found if f[1] == "torch.load" and f[3] != "weights_only=True"]
    stale = sorted(set(ALLOWED) - {(f[0], f[1]) for f in found})
    files = len(list(PACKAGE.rglob("*.py")))
    ok = not unguarded and not unsafe_load and not stale
    record("security", "source scan (ast): torch.load, pickle, eval/exec, unsafe YAML, "
           "trust_remote_code=True", f"{files} files, {len(found)} uses, all on the allow-list "
           f"({'; '.join(sorted({f'{a}: {b}' for a, b, _, _ in found}))})" if ok else
           f"unguarded {unguarded}, torch.load without weights_only {unsafe_load}, stale {stale}",
           ok, lost=0)
    assert not unguarded, f"risky uses not on the allow-list: {unguarded}"
    assert not unsafe_load, f"torch.load without weights_only=True: {unsafe_load}"
    assert not stale, f"allow-list entries for uses that are gone (remove them): {stale}"


def test_the_scan_sees_what_it_looks_for():
    """Each construct, written the ways code writes it, is found (a scan that finds nothing
    proves nothing)."""
    source = textwrap.dedent("""
        import pickle, torch, yaml, subprocess
        from transformers import AutoModel
        import numpy as np
        def f(path, m):
            torch.load(path)
            torch.load(path, weights_only=False)
            pickle.loads(b"")
            eval("1 + 1")
            exec("x = 1")
            yaml.load(open(path))
            np.load(path, allow_pickle=True)
            AutoModel.from_pretrained(path, trust_remote_code=True)
            kwargs = {"trust_remote_code": True}
        def g(path, trust_remote_code=True):
            pass
            subprocess.run("ls", shell=True)
            m.eval()  # a module's eval mode: not the builtin
    """)
    found = findings(source, "x.py")
    kinds = sorted(f[1] for f in found)
    assert kinds == sorted(["pickle", "torch.load", "torch.load", "pickle", "eval", "exec",
                            "yaml.load", "numpy.load(allow_pickle)", "trust_remote_code=True",
                            "trust_remote_code=True", "trust_remote_code=True",
                            "shell=True"]), found
    assert [f[3] for f in found if f[1] == "torch.load"] == ["WITHOUT weights_only=True"] * 2


def test_a_bin_adapter_is_not_unpickled_without_the_opt_in(tmp_path, monkeypatch):
    model = get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    tensors = read_adapter_weights(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(AdapterFileError, match="a pickle, which lorakit does not load"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert calls == []  # refused before anything was unpickled
    LoraModel.from_pretrained(make_tiny_llama(), tmp_path, allow_pickle=True)
    assert calls == [{"map_location": "cpu", "weights_only": True}]
    record("security", ".bin adapter without / with allow_pickle",
           "refused without torch.load being called; with the opt-in torch.load(weights_only="
           "True) once", True, lost=0)


# ------------------------------------------------------------------------------------ network

SITECUSTOMIZE = '''
"""Installed by test_security: every attempt to reach the network is logged, then refused."""
import json, os, socket

_LOG = os.environ["LORAKIT_NET_LOG"]


def _refuse(what, *args):
    with open(_LOG, "a") as f:
        f.write(json.dumps([what, repr(args)[:200]]) + "\\n")
    raise OSError(f"network blocked by the test: {what} {args!r}"[:300])


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect_ex", address)
    return _connect_ex(self, address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = lambda *a, **k: _refuse("getaddrinfo", *a)
socket.gethostbyname = lambda *a, **k: _refuse("gethostbyname", *a)
socket.create_connection = lambda *a, **k: _refuse("create_connection", *a)
'''


@pytest.mark.default_model
def test_the_default_model_trains_and_generates_with_the_network_blocked(tmp_path,
                                                                         default_model_dir):
    """The demo's path, shortened (the demo itself takes minutes on 2 cores): the embedded
    default model, `lorakit train` (with before/after samples) and `lorakit generate` with
    its adapter, in fresh processes whose sockets refuse to connect."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"PYTHONPATH": str(site), "LORAKIT_NET_LOG": str(log), "PYTHONWARNINGS": "ignore"}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('x', 1)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and log.read_text(), "the block is not in place"
    log.unlink()
    data = tmp_path / "train.jsonl"
    write_sum_rows(data, 4)
    out = tmp_path / "run"
    commands = [
        ["train", "--data", data, "--output", out, "--max-steps", 1, "--batch-size", 2,
         "--max-length", 64, "--lora-r", 4, "--set", "output.samples=1",
         "--set", "output.sample_max_new_tokens=2"],
        ["generate", "--adapter", out / "adapter", "--chat", "--max-new-tokens", 2, "2 plus 2?"],
    ]
    results = [subprocess.run([sys.executable, "-m", "lorakit", *map(str, c)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
               for c in commands]
    attempts = log.read_text().splitlines() if log.exists() else []
    ok = all(r.returncode == 0 for r in results) and not attempts
    record("security", "default model: lorakit train + generate with sockets blocked, "
           "HF_HUB_OFFLINE unset", f"exit {[r.returncode for r in results]}, {len(attempts)} "
           "network attempts" + (f": {attempts[:3]}" if attempts else ""), ok, lost=0)
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not attempts, attempts


# ----------------------------------------------------------------------------- path escapes


@pytest.mark.parametrize("name", ["..", "../outside", "/etc", "a/b", "x/../../y", ".", ""])
def test_adapter_names_cannot_leave_their_directory(name, tmp_path):
    model = get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="invalid adapter name"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="invalid adapter name"):
        adapter_dir(tmp_path, name)
    record("security", f"adapter name {name!r}", "ConfigError (add_adapter and adapter_dir)",
           True, lost=0)


def test_an_adapter_directory_linked_out_of_the_tree_is_not_followed(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "saved"
    outside.mkdir()
    root.mkdir()
    (root / "second").symlink_to(outside)
    model = get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("second", LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(AdapterFileError, match="symbolic link out of"):
        model.save_pretrained(root)  # "second" would be written through the link
    assert list(outside.iterdir()) == []
    with pytest.raises(AdapterFileError, match="symbolic link out of"):
        adapter_dir(root, "second")  # and is not read through it either
    record("security", "adapter sub-directory that is a symlink out of the tree",
           "AdapterFileError on save and load; nothing written outside", True, lost=0)


def test_checkpoint_links_are_never_listed_pruned_or_written_through(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "trainer_state.json").write_text("{}")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-99").symlink_to(outside / "keep")  # would be the latest
    (out / "checkpoint-1").symlink_to(outside / "keep")  # would be pruned first
    model = get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    from lorakit.training.checkpoint import TrainState
    assert list_checkpoints(out) == [] and latest_checkpoint(out) is None
    for step in (1, 2, 3):  # step 1 replaces the link checkpoint-1, then pruning runs
        save_checkpoint(out, model, opt, sched, TrainState(step=step), {}, save_total_limit=1)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert (outside / "keep" / "trainer_state.json").read_text() == "{}"  # untouched
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (out / "checkpoint-99").is_symlink()  # not ours: left alone, never resumed from
    with atomic_directory(out / "checkpoint-99") as tmp:  # writing over a link replaces it
        (tmp / "f").write_text("x")
    assert not (out / "checkpoint-99").is_symlink()
    assert sorted(p.name for p in (outside / "keep").iterdir()) == ["trainer_state.json"]
    record("security", "checkpoint-N symlinks out of the run directory",
           "never listed or resumed from; pruning and writes replace the link, never what it "
           "points to", True, lost=0)


def test_resolved_config_has_no_remote_code(tmp_path):
    """trust_remote_code is off unless the config turns it on."""
    from lorakit.training.run_config import run_config
    cfg = run_config(None, {}, [])
    assert cfg.model.trust_remote_code is False
    assert json.loads(json.dumps(cfg.model.trust_remote_code)) is False
