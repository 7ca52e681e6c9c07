"""`cascade-local serve`: the engine behind OpenAI- and Anthropic-compatible HTTP endpoints.

One scheduler thread owns the engine and batches requests as they arrive (`scheduler`); snapshots of
evaluated prompts are reused across requests (`prefix_cache`); each API's JSON is translated to one
chat job and back (`chat`, `openai_api`, `anthropic_api`); `app` is the thin Starlette layer.
"""
