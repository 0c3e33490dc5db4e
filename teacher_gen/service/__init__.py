"""The generation service: `potstill serve` keeps one teacher loaded and works through a persistent
queue of generation jobs; `potstill jobs` talks to it over HTTP.

    settings.py  `ServeConfig` (what `potstill serve` takes), tokens, the settings that need a model load
    spec.py      `JobSpec`: a job as the API takes it, derived from `GenerateConfig`'s fields; its checks
    jobqueue.py  `JobQueue`: jobs and their progress in SQLite under `--state`, so a restart loses nothing
    worker.py    `ServiceTeacher` (the model, loaded once) and `JobRunner` (the thread that runs jobs)
    app.py       the FastAPI app: routes, bearer-token check, one-line error bodies
    server.py    `serve()`: state-dir lock, socket, uvicorn, orderly shutdown
    client.py    `ServiceClient`: the HTTP client behind `potstill jobs` (and bench/serve_load.py)

Nothing here imports torch, FastAPI or httpx at package import; each module imports what it uses.
"""
