"""Training on several processes (torchrun, gloo on CPU): the 1-process adapter from 2 processes
(replicate and FSDP2), exact resume of a 2-process run, and ill-configured launches that fail at
once with one message on every rank. Every launch is bounded in time (its whole process group is
killed on a timeout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_tiny_llama, write_sum_rows
from safetensors.torch import load_file
from test_trainer import counting_data, losses

from lorakit import LoraConfig, SFTTrainer, TrainConfig, get_lora_model
from lorakit.base import quantize_model
from lorakit.training.distributed import (LaunchEnv, LaunchError, MultiProcessGroup,
                                          ProcessGroup, launch_env, per_rank_batch_size,
                                          process_group)

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")

# 25 examples in global micro-batches of 4: every epoch ends with a batch of one, which leaves
# rank 1 without an example (it runs a forward that trains nothing); the 7 eval examples make one
# eval batch, so rank 1 idles there too.
N_TRAIN = 25
# adam_epsilon: Adam divides a gradient by its own magnitude, so a component that is a sum of
# nearly cancelling terms (whose last bits depend on the summation order, which differs between 1
# and 2 processes) would get an arbitrary step of size lr; a larger epsilon keeps the update
# proportional to the gradient, so the adapters are compared tightly on what the ranks compute.
EQUAL = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             eval_steps=2, adam_epsilon=1e-4)
ONE_PROCESS_TWIN = EQUAL | {"per_device_train_batch_size": 4}  # the same global batch of 8
NF4 = dict(max_steps=2, per_device_train_batch_size=2, adam_epsilon=1e-4)  # 1 process: 4
CKPT = dict(lora={"lora_dropout": 0.1}, max_steps=6, per_device_train_batch_size=2,
            save_steps=3, save_total_limit=None, warmup_steps=1)


def make(out: Path, lora: dict | None = None, n_train: int = N_TRAIN, nf4: bool = False,
         **train) -> SFTTrainer:
    """test_trainer's make_trainer, with a training set whose batches do not split evenly;
    nf4: test_qlora's tiny model (sized for bitsandbytes' CPU kernels) in 4-bit."""
    if nf4:
        from test_qlora import tiny_llama
        base = quantize_model(tiny_llama(), "nf4")
        lora = {"target_modules": "all-linear"} | (lora or {})
    else:
        base = make_tiny_llama(initializer_range=0.3)
    model = get_lora_model(base, LoraConfig(**({"r": 8, "lora_alpha": 16} | (lora or {}))))
    args = TrainConfig(**({"output_dir": str(out), "learning_rate": 1e-2, "logging_steps": 1,
                           "save_steps": None, "bf16": False, "disable_tqdm": True} | train))
    return SFTTrainer(model, args, train_data=counting_data(n_train),
                      eval_data=counting_data(7, seed=9))


SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from test_distributed import CKPT, EQUAL, NF4, make
    from lorakit.training.distributed import shutdown

    out, scenario = Path(sys.argv[1]), sys.argv[2]
    if scenario == "runs":
        make(out / "replicate", distributed_mode="ddp", **EQUAL).train()  # the alias
        trainer = make(out / "fsdp2", distributed_mode="fsdp2", **EQUAL)
        trainer.train()
        for module in trainer.model.modules():  # roots keep their last forward's gather
            if isinstance(module, FSDPModule):
                module.reshard()
        params = list(trainer.model.named_parameters())
        base = [p for n, p in params if not p.requires_grad]
        if trainer.rank == 0:
            (out / "fsdp2" / "sharding.json").write_text(json.dumps({{
                "base_sharded": all(isinstance(p, DTensor) for p in base),
                "base_local": sum(p.to_local().numel() for p in base),
                "base_full": sum(p.numel() for p in base),
                "adapters_sharded": any(isinstance(p, DTensor) for n, p in params
                                        if p.requires_grad)}}))
        make(out / "full", **CKPT).train()
        make(out / "fsdp2-nf4", nf4=True, distributed_mode="fsdp2", **NF4).train()
    elif scenario == "resume":  # a copy of the full run's first checkpoint
        make(out / "resumed", **CKPT).train(resume_from_checkpoint=True)
    else:  # until a signal: each rank says where it stopped
        import os
        trainer = make(out / "signal", max_steps=100000, per_device_train_batch_size=2)
        (out / f"pid-{{trainer.rank}}").write_text(str(os.getpid()))
        result = trainer.train()
        print(f"rank {{trainer.rank}} interrupted={{result.interrupted}} "
              f"step={{result.global_step}}", flush=True)
    shutdown()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | env
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env.get(key) == "":
            del env[key]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The process's output; on a timeout its whole session (torchrun's workers) is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        raise AssertionError(f"timed out after {timeout} s (a hang?):\n{out[-3000:]}") from None


def torchrun(*args: str, timeout: float = 400) -> str:
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "2", *map(str, args)])
    out = finish(proc, timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One 2-process launch with these runs: replicate, fsdp2, a checkpointed replicate run,
    fsdp2 on a 4-bit base."""
    out = tmp_path_factory.mktemp("dist")
    script = out / "run.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    log = torchrun(script, out, "runs")
    (out / "log.txt").write_text(log)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    make(out, **ONE_PROCESS_TWIN).train()
    return out


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, one: Path) -> None:
    """Same adapter (fp32, up to float summation order), losses and eval metrics."""
    ours, theirs = adapter(out), adapter(one)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{key}: {m}")
    assert losses(out) == pytest.approx(losses(one), rel=1e-5)
    evals = [(r["step"], r["eval_loss"]) for r in records(out) if "eval_loss" in r]
    want = [(r["step"], r["eval_loss"]) for r in records(one) if "eval_loss" in r]
    assert [s for s, _ in evals] == [s for s, _ in want] == [2, 4]
    assert [x for _, x in evals] == pytest.approx([x for _, x in want], rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_the_one_process_adapter(launched, one_process):
    out = launched / "replicate"
    assert_same_run(out, one_process)
    # rank 0 alone wrote: one record per step and eval, no duplicate lines
    assert [r["step"] for r in records(out)] == [1, 2, 2, 3, 4, 4]
    dist = json.loads((out / "run_config.json").read_text())["distributed"]
    # asked for by its alias "ddp", reported by its name
    assert dist == {"mode": "replicate", "world_size": 2, "per_rank_batch_size": 2,
                    "global_batch_size": 8}
    log = (launched / "log.txt").read_text()
    for mode in ("replicate", "fsdp2"):  # reported at the start, by rank 0 only
        assert log.count(f"lorakit: 2 ranks ({mode}, gloo): global batch 8 = 2 per rank x 2 "
                         "ranks x 2 accumulation step(s)") == 1, log
    assert log.count("lorakit: step=4 eval_loss") == 2  # replicate and fsdp2, rank 0 only


@pytest.mark.slow
def test_fsdp2_shards_the_base_and_saves_the_unsharded_adapter(launched, one_process):
    out = launched / "fsdp2"
    assert_same_run(out, one_process)
    shards = json.loads((out / "sharding.json").read_text())
    assert shards["base_sharded"] and not shards["adapters_sharded"]
    assert shards["base_local"] <= shards["base_full"] / 2 + 1000  # each rank holds half
    # a PEFT-loadable adapter: PEFT on the plain base gives our 1-process model's logits
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    peft_model = peft.PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3),
                                                out / "adapter")
    reference = peft.PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3),
                                               one_process / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_shards_a_4bit_base(launched, tmp_path):
    one = tmp_path / "one"
    make(one, nf4=True, **(NF4 | {"per_device_train_batch_size": 4})).train()
    ours, theirs = adapter(launched / "fsdp2-nf4"), adapter(one)
    assert ours.keys() == theirs.keys() and len(ours) == 28  # all-linear, 2 layers
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


def test_fsdp2_refuses_an_8bit_base():
    model = get_lora_model(make_tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    ranks = MultiProcessGroup(LaunchEnv(0, 2, 0, "localhost", 29500), "fsdp2")
    ranks.check_model(model)  # unquantized: fine
    from test_qlora import tiny_llama
    model = get_lora_model(quantize_model(tiny_llama(), "int8"),
                           LoraConfig(r=4, target_modules="all-linear"))
    MultiProcessGroup(LaunchEnv(0, 2, 0, "localhost", 29500), "ddp").check_model(model)
    with pytest.raises(LaunchError, match="fsdp2' cannot shard bitsandbytes 8-bit weights"):
        ranks.check_model(model)


@pytest.mark.slow
def test_two_process_run_resumes_exactly(launched):
    full = launched / "full"
    assert [p.name for p in sorted(full.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]
    resumed = launched / "resumed"
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    log = torchrun(launched / "run.py", launched, "resume")
    assert log.count("resumed from") == 1, log[-3000:]
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):  # dropout and data position carry over on both ranks
        assert got[step] == want[step], (step, got, want)
    for key, value in adapter(full).items():
        assert torch.equal(adapter(resumed)[key], value), key


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(launched):
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "2", str(launched / "run.py"), str(launched), "signal"])
    metrics, pid = launched / "signal" / "metrics.jsonl", launched / "pid-1"
    deadline = time.time() + 200
    while not (pid.is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        if proc.poll() is not None or time.time() > deadline:
            finish(proc, timeout=1)
            raise AssertionError("the run ended or stalled before a signal could be sent")
        time.sleep(0.2)
    os.kill(int(pid.read_text()), signal.SIGTERM)  # rank 1 only, not torchrun
    out = finish(proc, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    # the two ranks print at the same moment into one pipe: their lines may run together
    stops = sorted(re.findall(r"rank (\d) interrupted=(\w+) step=(\d+)", out))
    assert [rank for rank, _, _ in stops] == ["0", "1"], out[-3000:]
    assert stops[0][1:] == stops[1][1:] and stops[0][1] == "True", stops
    step = int(stops[0][2])
    assert (launched / "signal" / f"checkpoint-{step}" / "trainer_state.json").is_file()


# ------------------------------------------------------------------------ ill-configured launches

LIBRARY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_distributed import make
    import lorakit.training.distributed as d
    try:
        make(sys.argv[1], n_train=1 if sys.argv[2] == "one-example" else 25, ddp_timeout=3).train()
    except ValueError as e:
        print(f"error (rank {{d.launch_env().rank}}): {{e}}", flush=True)
        sys.exit(2)
""")


@pytest.mark.slow
def test_ill_configured_launches_fail_at_once_on_every_rank(tmp_path):
    script = tmp_path / "lib.py"
    script.write_text(LIBRARY.format(tests=TESTS))
    cli = [sys.executable, "-m", "lorakit", "train", "--data", str(tmp_path / "none.jsonl"),
           "--output", str(tmp_path / "out")]
    port = str(free_port())
    rdzv = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    cases = {  # name -> (command, env per rank, the message every rank must print)
        "no MASTER_ADDR": (cli, {"WORLD_SIZE": "2", "MASTER_ADDR": "", "MASTER_PORT": ""},
                           "RANK/WORLD_SIZE are set but MASTER_ADDR, MASTER_PORT are not"),
        "global batch": (cli + ["--set", "training.global_batch_size=5"], rdzv,
                         "global_batch_size=5 is not divisible by 2 rank(s) x 1 accumulation"),
        "one example": ([sys.executable, str(script), str(tmp_path / "o1"), "one-example"], rdzv,
                        "1 training example(s) for 2 ranks: every rank needs at least one"),
    }
    procs, t0 = [], time.time()
    for name, (cmd, env, message) in cases.items():
        for rank in (0, 1):
            procs.append((name, rank, message, start(cmd, RANK=str(rank), LOCAL_RANK=str(rank),
                                                     **env)))
    # rank 1 of this launch never starts: rank 0 gives up after ddp_timeout (3 s)
    lonely = start([sys.executable, str(script), str(tmp_path / "o2"), "train"], RANK="0",
                   LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    for name, rank, message, proc in procs:
        out = finish(proc, timeout=180)
        assert proc.returncode == 2, (name, rank, out[-3000:])
        errors = [line for line in out.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and message in errors[0], (name, rank, out[-3000:])
        assert f"rank {rank}" in errors[0], (name, errors)
    out = finish(lonely, timeout=180)
    assert lonely.returncode == 2, out[-3000:]
    assert "rank 0 could not join the other 1 rank(s) at 127.0.0.1" in out
    assert "within 3 s" in out
    assert time.time() - t0 < 170


# ---------------------------------------------------------------------------- fast, in-process

def test_launch_environment_is_validated():
    assert launch_env({}) is None  # one process: nothing happens
    assert launch_env({"WORLD_SIZE": "1"}) is None
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "29500"}
    got = launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.is_main) == (1, 4, 1, False)
    with pytest.raises(LaunchError, match="MASTER_ADDR is not: launch with torchrun"):
        launch_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})
    with pytest.raises(LaunchError, match="WORLD_SIZE.*are not"):
        launch_env({"RANK": "0"})
    with pytest.raises(LaunchError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
        launch_env(env | {"RANK": "4"})
    with pytest.raises(LaunchError, match="MASTER_PORT='x' is not an integer"):
        launch_env(env | {"MASTER_PORT": "x"})


def test_per_rank_batch_size():
    args = TrainConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert per_rank_batch_size(args, 4) == 3
    args = TrainConfig(global_batch_size=48, gradient_accumulation_steps=2)
    assert per_rank_batch_size(args, 4) == 6 and per_rank_batch_size(args, 1) == 24
    with pytest.raises(LaunchError, match="not divisible by 5 rank"):
        per_rank_batch_size(args, 5)
    with pytest.raises(ValueError, match="distributed_mode"):
        TrainConfig(distributed_mode="zero3")


def test_ddp_is_an_alias_of_replicate():
    assert TrainConfig().distributed_mode == "replicate"
    assert TrainConfig(distributed_mode="ddp").distributed_mode == "replicate"
    env = LaunchEnv(0, 2, 0, "localhost", 29500)
    assert MultiProcessGroup(env, "ddp").mode == MultiProcessGroup(env).mode == "replicate"
    with pytest.raises(ValueError, match="'ddp' is an alias of 'replicate'"):
        TrainConfig(distributed_mode="DDP")


def test_one_process_is_a_group_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    group = process_group(TrainConfig(distributed_mode="fsdp2"))  # no effect on one process
    assert type(group) is ProcessGroup
    assert (group.rank, group.world_size, group.is_main, group.mode) == (0, 1, True, "single")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert group.reduce_step([p], 1.5, False) == (1.5, False)
    assert torch.equal(p.grad, torch.full((3,), 2.0))  # the gradient is the whole-run one
    assert group.sum_ints(3, 4) == [3, 4] and group.sum_floats(0.5, 2) == [0.5, 2.0]
    assert group.any_rank(True) and not group.any_rank(False)
    # a signal after the step's reduce still stops one process at that step
    assert group.should_stop(False, True)
    assert group.run_config(4, 2) == {} and group.describe(4, 2) is None
    rng = torch.get_rng_state()
    group.seed_step(42, 7)  # one process keeps the stream seeded once, at the start
    assert torch.equal(torch.get_rng_state(), rng)


def test_global_batch_size_on_one_process_is_per_device_over_accumulation(tmp_path):
    a = make(tmp_path / "a", max_steps=2, per_device_train_batch_size=4,
             gradient_accumulation_steps=2)
    b = make(tmp_path / "b", max_steps=2, global_batch_size=8, gradient_accumulation_steps=2)
    assert a.batch_size == b.batch_size == 4 and a.total_steps() == b.total_steps()
    a.train()
    b.train()
    assert adapter(tmp_path / "a").keys() == adapter(tmp_path / "b").keys()
    for key, value in adapter(tmp_path / "a").items():
        assert torch.equal(adapter(tmp_path / "b")[key], value)


# ------------------------------------------------------------------------------ the CLI, torchrun

@pytest.mark.slow
@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer
def test_cli_under_torchrun_trains_once_and_writes_once(tmp_path, smol_tokenizer,
                                                        tiny_chat_dir):
    model_dir = tiny_chat_dir
    data = tmp_path / "train.jsonl"
    write_sum_rows(data, 25)
    out = tmp_path / "out"
    log = torchrun("-m", "lorakit", "train", "--model", model_dir, "--data", data, "--output", out,
                   "--max-steps", 2, "--batch-size", 4, "--lr", "1e-3",
                   "--set", "training.logging_steps=1", "--set", "output.samples=1",
                   "--set", "output.sample_max_new_tokens=2")
    assert log.count("lorakit: resolved config") == 1
    assert log.count("global batch 8 = 4 per rank x 2 ranks x 1 accumulation step(s)") == 1
    assert log.count("lorakit: finished step 2") == 1
    assert "error" not in log.lower()
    assert [r["step"] for r in records(out)] == [1, 2]
    for name in ("config.yaml", "report.md", "adapter/adapter_config.json",
                 "checkpoint-2/optimizer.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run_config.json").read_text())["distributed"]["world_size"] == 2
    peft.PeftModel.from_pretrained(make_tiny_llama(vocab_size=len(smol_tokenizer)), out / "adapter")
