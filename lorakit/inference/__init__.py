"""Inference with adapters, without HTTP: batched generation and exact-match scoring, the
continuous-batching engine (one scheduler thread, each row with its own adapter) and the pool of
adapters it keeps in the model.

Owns: turning prompts into completions with a (LoRA) model. May import compat, atomic, errors,
base, lora and data; imported by training (rollouts, samples), serving, recipes, demo and cli.
"""
