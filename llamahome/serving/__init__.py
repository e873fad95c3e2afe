"""The OpenAI-compatible HTTP server behind ``python -m llamahome.serve``.

``app`` holds the FastAPI routes, ``guards`` auth and the body limit, ``schemas`` the strict
request models (OpenAI's shapes), ``errors`` the OpenAI error objects, ``inputs`` and
``responses`` what goes into and out of the engine; ``engine`` is the thread that owns the model
and runs continuous batching over one KV cache per request (``decoding``: one request's state,
``memory``: the KV pool admission draws on, ``metrics``: ``/metrics``). No Lightning, no
training code.
"""
