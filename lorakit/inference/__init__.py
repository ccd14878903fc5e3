"""Inference with adapters, without HTTP: batched generation and exact-match scoring
(`generate`), the continuous-batching engine (`engine`: one scheduler thread, each row with its
own adapter) over the rows that decode together (`batch`), and the pool of adapters it keeps in
the model (`adapters`).

Owns: turning prompts into completions with a (LoRA) model. May import compat, atomic, errors,
base, lora and data; may be imported by the layers above it: training (samples, rollouts),
serving (the HTTP server), recipes, demo and cli.
"""
