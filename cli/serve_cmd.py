"""`potstill serve`: keep a teacher loaded and run generation jobs from a persistent queue over HTTP.

Flags default to None so that only flags actually given override `--config FILE`; the defaults
live in `ServeConfig` (repeatable flags not given at all stay None too). FastAPI, uvicorn, torch
and transformers are imported when it runs.
"""

from __future__ import annotations

import typer

from potstill.cli.options import REQUIRED_OR_CONFIG, default_text, threads_option
from potstill.cli.threads import use_threads
from potstill.teacher_gen.service.settings import TOKEN_ENV, ServeConfig

D = ServeConfig()


def _d(value: object, flag: str | None = None) -> str:
    return f"  [default: {default_text(value, flag)}]"


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        config: str = typer.Option(None, "--config", help="YAML or TOML file of settings (flags override it)."),
        teacher: str = typer.Option(None, help="Teacher, loaded once: hub name, local folder or .gguf file.  " + REQUIRED_OR_CONFIG),
        backend: str = typer.Option(None, help="hf or vllm." + _d(D.backend)),
        tokenizer: str = typer.Option(None, help="Tokenizer, if not the teacher's.  [default: the teacher's]"),
        revision: str = typer.Option(None, help="Model revision (hub branch, tag or commit).  [default: the hub's default branch]"),
        dtype: str = typer.Option(None, help="auto (the checkpoint's), bfloat16, float16 or float32." + _d(D.dtype)),
        device: str = typer.Option(None, help="cpu, cuda, cuda:1, or auto." + _d(D.device)),
        trust_remote_code: bool = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                               help="Allow the teacher's own modeling code (jobs cannot turn it on)."
                                               + _d(False, "--trust-remote-code/--no-trust-remote-code")),
        gpu_memory_utilization: float = typer.Option(
            None, help="vLLM GPU memory share.  [default: 0.9 on a GPU; on CPU a 1 GiB KV cache, or $VLLM_CPU_KVCACHE_SPACE GiB]"),
        tensor_parallel_size: int = typer.Option(None, help="vLLM tensor parallel size." + _d(D.tensor_parallel_size)),
        enforce_eager: bool = typer.Option(None, "--enforce-eager/--no-enforce-eager",
                                           help="vLLM: run eagerly, no compilation at start-up.  [default: on for CPU, off for GPU]"),
        max_top_k: int = typer.Option(None, help="vLLM: largest --top-k a job may ask for." + _d(D.max_top_k)),
        host: str = typer.Option(None, help="Address to listen on; anything but loopback needs a token." + _d(D.host)),
        port: int = typer.Option(None, help="Port (0: any free one, written to <state>/service.json)." + _d(D.port)),
        state: str = typer.Option(None, help="Folder of the job queue (SQLite) and the service's files." + _d(D.state)),
        token_file: str = typer.Option(None, help=f"File holding the bearer token.  [default: ${TOKEN_ENV}]"),
        max_crashes: int = typer.Option(None, help="Fail a job after the service died this often while running it."
                                        + _d(D.max_crashes)),
        data_root: list[str] = typer.Option(None, metavar="DIR", help="Folder jobs may read prompt sets from and write stores to "
                                            "(repeatable). Without any root, jobs can name no local path.  [default: none]"),
        read_root: list[str] = typer.Option(None, metavar="DIR", help="Folder jobs may read prompt sets from (repeatable).  [default: none]"),
        write_root: list[str] = typer.Option(None, metavar="DIR", help="Folder jobs may write (and read) stores in (repeatable).  [default: none]"),
        allow_url_scheme: list[str] = typer.Option(None, metavar="SCHEME", help="Remote URL scheme jobs may name, e.g. s3 or gs "
                                                   "(repeatable).  [default: none]"),
        max_body_bytes: int = typer.Option(None, help="Largest request body; larger ones get 413."
                                           + _d(D.max_body_bytes)),
        allow_host: list[str] = typer.Option(None, metavar="NAME", help="Host name to answer to besides loopback and --host "
                                             "(repeatable; checked when no token is set, or whenever given).  [default: none]"),
        threads: str = threads_option(),
    ) -> None:
        """Serve a teacher: run `potstill generate` jobs one after another from a queue that survives restarts."""
        overrides = {k: (v or None) if isinstance(v, list | tuple) else v for k, v in locals().items()}
        overrides.pop("config")
        overrides.pop("threads")
        settings = ServeConfig.build(config, **overrides)
        use_threads(threads)

        from potstill.teacher_gen.service.server import serve as run_service

        run_service(settings)
