"""`lorakit serve`: the OpenAI-compatible API and the HTTP server over `lorakit.inference`'s
engine.

Owns: HTTP (request checking, response shapes, errors as status codes, shutdown). May import
every layer below it (compat ... inference, training); imported by recipes, demo and cli.
"""
