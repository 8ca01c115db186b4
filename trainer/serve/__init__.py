"""`forge serve`: an OpenAI-compatible HTTP server with continuous batching, Prometheus metrics and a chat page.

    config.py      ServeConfig: the options of `forge serve`
    chat.py        chat templates, prompt encoding, the ids that end a reply
    textstream.py  incremental detokenization with stop strings
    scheduler.py   the continuous-batching loop over trainer/inference/slots.py
    protocol.py    OpenAI request models, validation and response bodies
    app.py         the FastAPI app (completions, chat completions, SSE streaming, errors, API key)
    metrics.py     Prometheus text for GET /metrics
    server.py      uvicorn in the foreground (`forge serve`) or on a background thread (in-process)
    bridge.py      `forge serve`'s two processes: the model's loop, and HTTP across a pipe
    static/        the chat page served at /
Guide: docs/serve.md.
"""
