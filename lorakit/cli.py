"""The `lorakit` command: train, eval, generate, merge, export, inspect, serve, demo.

    lorakit train --config run.yaml --max-steps 200 --lr 2e-4
    lorakit eval --adapter out/adapter --data eval.jsonl
    lorakit generate --adapter out/adapter --chat "Normalise: 5th of March '21"
    lorakit merge --adapter out/adapter --output merged/
    lorakit export --adapter out/adapter --format gguf --output model.gguf --outtype q8_0
    lorakit inspect out/adapter
    torchrun --nproc_per_node 4 -m lorakit train --config run.yaml   # data-parallel, 4 processes

Errors a user can cause print one line and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lorakit.base.config import DTYPE_CHOICES
from lorakit.base.quantize import QUANT_TYPES
from lorakit.errors import OutputExistsError, UserError
from lorakit.inference.engine import MAX_BATCH, MAX_WAITING, PREFILL_TOKENS_PER_STEP
from lorakit.log import get_logger
from lorakit.training.run_config import SINGLE_PROCESS_ALIASES, TRAIN_FLAGS, field_type, run_config

__all__ = ["SINGLE_PROCESS_ALIASES", "build_parser", "main"]

log = get_logger("lorakit.cli")


# ---------------------------------------------------------------------------------- sub-commands


def _load_base(
    name: str | None,
    dtype: str = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    device=None,
):
    from lorakit.base import load_model

    return load_model(
        name,
        dtype=dtype,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        device=device,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from lorakit.recipes import SFTRecipe, summary_lines

    cfg = run_config(
        args.config,
        {spelling: getattr(args, _dest(spelling)) for spelling in TRAIN_FLAGS},
        args.set or [],
    )
    recipe = SFTRecipe(cfg, resume=args.resume).setup()
    outcome = recipe.train()
    for line in summary_lines(outcome) if recipe.is_main else []:
        log.info(line)
    return 0


def _load_with_adapters(
    model_name: str | None,
    adapters: list[str],
    dtype: str = "auto",
    quantization: str | None = None,
    allow_pickle: bool = False,
):
    from lorakit.lora import LoraModel
    from lorakit.lora.files import read_adapter_config

    model, tokenizer = _load_base(model_name, dtype, quantization)
    if not adapters:
        return model, tokenizer, None
    lora = None
    for i, path in enumerate(adapters):
        read_adapter_config(path)  # a clear error for a path that is not an adapter
        name = "default" if i == 0 else f"adapter{i}"
        if lora is None:
            lora = LoraModel.from_pretrained(
                model, path, adapter_name=name, allow_pickle=allow_pickle
            )
        else:
            lora.load_adapter(path, name, allow_pickle=allow_pickle)
    lora.set_adapter(lora.list_adapters())  # several adapters: their updates add up
    return lora, tokenizer, lora


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.data import load_records
    from lorakit.inference.generate import completion_examples, exact_match_rate
    from lorakit.training import SFTObjective, TrainConfig, evaluate, resolve_launch

    model, tokenizer, _ = _load_with_adapters(
        args.model, args.adapter or [], args.dtype, allow_pickle=args.allow_pickle
    )
    if not hasattr(model, "peft_config"):  # evaluate the bare base model through the same path
        from lorakit.lora.model import LoraModel

        model = LoraModel(model, None)
    settings = TrainConfig(max_length=args.max_length, per_device_eval_batch_size=args.batch_size)
    objective = SFTObjective(model, tokenizer, settings)
    data = objective.prepare(args.data, "eval")
    metrics = evaluate(model, objective, data, resolve_launch(settings), args.batch_size)
    examples = completion_examples(load_records(args.data))
    if examples and not args.no_generate:
        rate, _ = exact_match_rate(
            model, tokenizer, examples[: args.limit or None], args.max_new_tokens, args.batch_size
        )
        metrics["exact_match"] = rate
        metrics["exact_match_rows"] = len(examples[: args.limit or None])
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorakit.inference.generate import generate_texts

    model, tokenizer, lora = _load_with_adapters(
        args.model, args.adapter or [], args.dtype, allow_pickle=args.allow_pickle
    )
    if args.merged:
        if lora is None:
            raise UserError("--merged needs at least one --adapter")
        model = lora.merge_and_unload(safe_merge=True)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [system + [{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    outs = generate_texts(
        model,
        tokenizer,
        prompts,
        args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_p=args.top_p,
    )
    for text in outs:
        print(text.strip() if args.chat else text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.lora import LoraModel, export_merged
    from lorakit.lora.files import read_adapter_config

    read_adapter_config(args.adapter)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    model, tokenizer = _load_base(args.model, "float32")
    # merged in fp32 and rounded once to --dtype; written atomically
    lora = LoraModel.from_pretrained(model, args.adapter, allow_pickle=args.allow_pickle)
    export_merged(lora, out, args.dtype, tokenizer)
    print(f"lorakit: merged model ({args.dtype}) -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lorakit.lora.gguf_export import check_outtype, export_gguf, export_gguf_lora
    from lorakit.lora.modelfile import write_modelfile

    lora_only = args.format == "gguf-lora"
    check_outtype(args.outtype, adapter=lora_only)  # before minutes of loading
    if lora_only and not args.adapter:
        raise UserError("--format gguf-lora writes an adapter: pass --adapter DIR")
    out = Path(args.output)
    if out.is_dir():
        raise OutputExistsError(f"--output {out} is a directory; name the .gguf file to write")
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} exists (pass --overwrite to replace it)")
    # merged in fp32 (a quantized base dequantized exactly) and rounded once to --outtype
    model, tokenizer, lora = _load_with_adapters(
        args.model,
        [args.adapter] if args.adapter else [],
        "float32",
        args.quantization,
        allow_pickle=args.allow_pickle,
    )
    if lora_only:
        export_gguf_lora(lora, out, outtype=args.outtype)
        base = _base_gguf(args.model)
        modelfile = write_modelfile(out, tokenizer, base or "./base.gguf", f"./{out.name}")
        if base is None:
            print(
                f"lorakit: {modelfile.name} expects the base as ./base.gguf beside it: "
                f"lorakit export --model {args.model} --format gguf --output "
                f"{out.with_name('base.gguf')}"
            )
    else:
        export_gguf(lora or model, out, tokenizer, args.outtype)
        modelfile = write_modelfile(out, tokenizer, f"./{out.name}")
    print(f"lorakit: {args.format} ({args.outtype}) -> {out}")
    print(f"lorakit: Ollama: ollama create my-model -f {modelfile}")
    return 0


def _base_gguf(model: str | None) -> str | None:
    """The GGUF file the base was read from (the default model's, or --model file.gguf)."""
    from lorakit.base.default_model import find_default_gguf
    from lorakit.base.gguf_base import is_gguf_file

    if model is None:
        return str(find_default_gguf())
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_file() and is_gguf_file(path) else None


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.serving.server import LOOPBACK, build, run

    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None:
        print(
            f"lorakit: warning: serving on {args.host} without --api-key: anyone who can "
            "reach this port can use the model and load adapters",
            file=sys.stderr,
        )
    server = build(
        args.model,
        args.adapter or [],
        dtype=args.dtype,
        quantization=args.quantization,
        served_name=args.served_model_name,
        max_loras=args.max_loras,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        max_prefill_tokens=args.max_prefill_tokens,
        max_tokens_limit=args.max_tokens_limit,
        api_key=api_key,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
    )
    run(server, args.host, args.port, args.grace)
    return 0


def describe_adapter(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """What an adapter directory holds, read from its files alone (no model is loaded;
    `allow_pickle`: an old PEFT adapter_model.bin is read, with torch.load weights only)."""
    from lorakit.lora.files import (
        CONFIG_NAME,
        LEGACY_WEIGHTS_NAME,
        WEIGHTS_NAME,
        adapted_modules,
        read_adapter_config,
        read_adapter_weights,
        read_weights_header,
    )
    from lorakit.lora.pissa import is_pissa

    path = Path(path)
    config = read_adapter_config(path)
    raw = json.loads((path / CONFIG_NAME).read_text())
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        header = read_weights_header(weights)  # shapes only: the data is not read
    elif (weights := path / LEGACY_WEIGHTS_NAME).is_file():
        tensors = read_adapter_weights(path, allow_pickle=allow_pickle)
        header = {k: (tuple(t.shape), str(t.dtype)) for k, t in tensors.items()}
    else:
        raise UserError(f"{path}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    size = weights.stat().st_size
    n_params = sum(math.prod(shape) for shape, _ in header.values())
    dtypes = {dtype for _, dtype in header.values()}
    modules = adapted_modules(header)
    variant = (
        ("DoRA" if config.use_dora else "LoRA")
        + (" + rsLoRA" if config.use_rslora else "")
        + (" (PiSSA init)" if is_pissa(config.init_lora_weights) else "")
    )
    targets = config.target_modules
    return {
        "path": str(path),
        "base_model": config.base_model_name_or_path,
        "variant": variant,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "rank_pattern": config.rank_pattern or None,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets})
        if isinstance(targets, list)
        else targets,
        "adapted_layers": len(modules),
        "modules_to_save": config.modules_to_save,
        "parameters": n_params,
        "dtypes": sorted(dtypes),
        "file_bytes": size,
        "written_by": f"peft {raw['peft_version']}" if "peft_version" in raw else "lorakit",
        "other_adapters": sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
        if path.is_dir()
        else [],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe_adapter(args.path, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "file_bytes":
            v = f"{v:,} bytes ({v / 2**20:.2f} MiB)"
        elif k == "parameters":
            v = f"{v:,}"
        if v not in (None, [], ""):
            print(f"{k:16s} {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.demo.run import run_demo

    return run_demo(
        output_dir=args.output,
        max_steps=args.max_steps,
        n_eval=args.eval_rows,
        objective=args.objective,
    )


# ------------------------------------------------------------------------------------ arguments


def _dest(spelling: str) -> str:
    return spelling.lstrip("-").replace("-", "_")


def _allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        help="also read an old PEFT adapter_model.bin (a pickle; torch.load with weights_only)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `lorakit` command: one sub-parser per command, each set up by its `_add_*`."""
    p = argparse.ArgumentParser(
        prog="lorakit", description="LoRA / QLoRA fine-tuning of causal LMs"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_merge(sub)
    _add_export(sub)
    _add_inspect(sub)
    _add_serve(sub)
    _add_demo(sub)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune with LoRA (YAML config + flag overrides)")
    t.add_argument("--config", help="YAML file with model/data/lora/training/output sections")
    for spelling, flag in TRAIN_FLAGS.items():  # one per config field, from the run config
        t.add_argument(
            spelling,
            *flag.aliases,
            dest=_dest(spelling),
            help=flag.help or None,
            type=field_type(flag.section, flag.key) if flag.choices is None else None,
            choices=flag.choices,
            nargs=flag.nargs,
        )
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output, or from CHECKPOINT",
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any config field, e.g. training.warmup_ratio=0.1",
    )
    t.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="eval loss / perplexity / token accuracy / exact match")
    e.add_argument("--model")
    e.add_argument("--adapter", action="append", help="adapter directory (repeatable)")
    e.add_argument("--data", required=True)
    e.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    e.add_argument("--max-length", dest="max_length", type=int, default=1024)
    e.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    e.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    e.add_argument("--limit", type=int, default=0, help="score exact match on the first N rows")
    e.add_argument(
        "--no-generate", dest="no_generate", action="store_true", help="skip exact-match generation"
    )
    e.add_argument("--json", action="store_true")
    _allow_pickle(e)
    e.set_defaults(func=cmd_eval)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with the base model and adapters")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--model")
    g.add_argument("--adapter", action="append", help="adapter directory (repeatable: summed)")
    g.add_argument("--merged", action="store_true", help="merge the adapters first")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    g.add_argument("--system", help="with --chat: a system message before the prompt")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    _allow_pickle(g)
    g.set_defaults(func=cmd_generate)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write base + adapter as one transformers model directory")
    m.add_argument("--model")
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--overwrite", action="store_true")
    _allow_pickle(m)
    m.set_defaults(func=cmd_merge)


def _add_export(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="write base + adapter as one GGUF file, or the adapter as a llama.cpp LoRA GGUF",
        description="GGUF for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile "
        "beside it. --format gguf: the merged model (or the base alone, without --adapter); "
        "--format gguf-lora: the adapter alone, for llama-server --lora and Ollama's ADAPTER.",
    )
    e.add_argument("--model", help="base model: directory, .gguf file or hub id (default: "
                   "the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    e.add_argument("--adapter", help="adapter directory (PEFT format)")
    e.add_argument("--format", choices=["gguf", "gguf-lora"], default="gguf")
    e.add_argument("--output", required=True, help="the .gguf file to write")
    e.add_argument(
        "--outtype",
        default="f16",
        help="gguf: f32, f16, bf16, q8_0 or q4_0; gguf-lora: f32, f16 or bf16 (default f16)",
    )
    e.add_argument(
        "--quantization",
        choices=QUANT_TYPES,
        help="load the base as the adapter was trained on it (QLoRA: nf4); it is dequantized "
        "exactly before merging",
    )
    e.add_argument("--overwrite", action="store_true")
    _allow_pickle(e)
    e.set_defaults(func=cmd_export)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="describe an adapter directory (lorakit's or PEFT's)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    _allow_pickle(i)
    i.set_defaults(func=cmd_inspect)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the base and adapters over an OpenAI-compatible API",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
        "/v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter, /health) over the base and "
        "its adapters, with Prometheus metrics at GET /metrics (vLLM's names under a 'lorakit:' "
        "prefix; needs pip install 'lorakit[metrics]').",
    )
    s.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument(
        "--adapter", action="append", metavar="NAME=DIR", help="an adapter to serve (repeatable)"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        dest="api_key",
        help="require 'Authorization: Bearer KEY' on every endpoint, /metrics included (or set "
        "LORAKIT_API_KEY)",
    )
    s.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="the base model's name in requests and /v1/models",
    )
    s.add_argument(
        "--max-loras",
        dest="max_loras",
        type=int,
        default=8,
        help="adapters kept in memory (least recently used leave first)",
    )
    s.add_argument(
        "--max-batch",
        dest="max_batch",
        type=int,
        default=MAX_BATCH,
        help=f"requests decoded together ({MAX_BATCH})",
    )
    s.add_argument(
        "--max-prefill-tokens",
        dest="max_prefill_tokens",
        type=int,
        default=PREFILL_TOKENS_PER_STEP,
        help="prompt tokens prefilled between two decoding steps: running rows wait meanwhile "
        f"({PREFILL_TOKENS_PER_STEP}; a longer prompt is prefilled in chunks of this size)",
    )
    s.add_argument(
        "--max-waiting",
        dest="max_waiting",
        type=int,
        default=MAX_WAITING,
        help=f"requests queued beyond the batch before answering 429 ({MAX_WAITING})",
    )
    s.add_argument(
        "--max-tokens-limit",
        dest="max_tokens_limit",
        type=int,
        default=1024,
        help="the largest max_tokens a request may ask for",
    )
    s.add_argument(
        "--adapter-root",
        dest="adapter_root",
        help="where POST /v1/load_lora_adapter may read adapters from",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM",
    )
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    s.add_argument("--quantization", choices=QUANT_TYPES, default=None)
    s.set_defaults(func=cmd_serve)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="fine-tune the default model on a small task, before/after")
    d.add_argument("--output", default="lorakit-demo")
    d.add_argument("--max-steps", dest="max_steps", type=int, default=None)
    d.add_argument("--eval-rows", dest="eval_rows", type=int, default=None)
    d.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="dpo: SFT on rows with an annotator's habit, then a DPO step that removes it",
    )
    d.set_defaults(func=cmd_demo)


def _rank() -> str:
    """' (rank R of N)' under torchrun, so that each rank's error reads as its own."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f" (rank {rank} of {world})" if rank is not None and world not in (None, "1") else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, UserError):  # anything else is a bug: it keeps its traceback
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"lorakit: error{_rank()}: {msg}", file=sys.stderr)
            return 2
        raise
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group
            from lorakit.training.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
