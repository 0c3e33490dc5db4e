"""`potstill generate`: run a teacher over a prompt set and fill a store.

Every flag defaults to None here so that only flags actually given override `--config FILE`;
the real defaults live in `GenerateConfig` (shown in --help). torch and transformers are
imported only when the command runs.
"""

from __future__ import annotations

import json

import typer

from potstill.cli.options import REQUIRED_OR_CONFIG, alias, default_text, pick, threads_option
from potstill.cli.threads import use_threads
from potstill.teacher_gen.config import GenerateConfig

D = GenerateConfig()


def _d(value: object, flag: str | None = None) -> str:
    return f"  [default: {default_text(value, flag)}]"


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        config: str = typer.Option(None, "--config", help="YAML or TOML file of settings (flags override it)."),
        teacher: str = typer.Option(None, help="Teacher: hub name, local folder or .gguf file.  " + REQUIRED_OR_CONFIG),
        prompts: str = typer.Option(None, help="Prompts: .jsonl, .json, .parquet, .csv or a saved datasets folder.  "
                                    + REQUIRED_OR_CONFIG),
        out: str = typer.Option(None, "--out", help="Store to write, path or URL (created if missing; reruns resume it).  "
                                + REQUIRED_OR_CONFIG),
        store: str = alias("--store"),
        mode: str = typer.Option(None, help="score (teacher forcing over given completions) or generate." + _d(D.mode)),
        backend: str = typer.Option(None, help="hf or vllm." + _d(D.backend)),
        tokenizer: str = typer.Option(None, help="Tokenizer, if not the teacher's.  [default: the teacher's]"),
        revision: str = typer.Option(None, help="Model revision (hub branch, tag or commit).  [default: the hub's default branch]"),
        trust_remote_code: bool = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                               help="Allow the teacher's own modeling code." + _d(False, "--trust-remote-code/--no-trust-remote-code")),
        top_k: int = typer.Option(None, help="Top-k log-probs kept per position." + _d(D.top_k)),
        logprob_dtype: str = typer.Option(None, help="float16 or float32 storage of log-probs." + _d(D.logprob_dtype)),
        targets: str = typer.Option(None, help="topk (log-probs), sampled (N draws per position as ids + counts), both, or hybrid (the exact top-k plus N draws from the rest)." + _d(D.targets)),
        samples: int = typer.Option(None, help="Draws per scored position for sampled targets." + _d(D.samples)),
        sampler: str = typer.Option(None, help="How the N draws are placed: iid, systematic or stratified (lower variance, still unbiased)." + _d(D.sampler)),
        codec: str = typer.Option(None, help="none; packed: bit-packed ids and counts, quantised log-probs (format 2.0); compact: packed, with "
                                 "sampled ids gap-coded and counts gamma-coded, for sampled targets (format 2.3); compact2: the same "
                                 "draws in about 0.85x the compact bytes (format 2.4)." + _d(D.codec)),
        logprob_bits: int = typer.Option(None, help="Packed codec: bits per log-prob." + _d(D.logprob_bits)),
        logprob_min: float = typer.Option(None, help="Packed codec: log-probs are clamped to [MIN, 0]." + _d(D.logprob_min)),
        hidden_layers: str = typer.Option(None, help="Hidden states to store, HF indexing: '4,8,-1' (0 = embeddings, -1 = last, after the final norm).  [default: none]"),
        hidden_dtype: str = typer.Option(None, help="bfloat16 or float16." + _d(D.hidden_dtype)),
        hidden_tokens: str = typer.Option(None, help="Hidden rows for all tokens or only scored ones." + _d(D.hidden_tokens)),
        hidden_chunk_tokens: int = typer.Option(None, help="Zarr chunk length along tokens." + _d(D.hidden_chunk_tokens)),
        score_prompt: bool = typer.Option(None, "--score-prompt/--no-score-prompt",
                                          help="Score every token, not only the completion." + _d(False, "--score-prompt/--no-score-prompt")),
        append_eos: bool = typer.Option(None, "--append-eos/--no-append-eos",
                                        help="Score mode: end given completions with EOS." + _d(True, "--append-eos/--no-append-eos")),
        max_new_tokens: int = typer.Option(None, help="Generate mode: tokens per completion." + _d(D.max_new_tokens)),
        temperature: float = typer.Option(None, help="Generate mode sampling temperature (0 = greedy)." + _d(D.temperature)),
        top_p: float = typer.Option(None, help="Generate mode nucleus sampling." + _d(D.top_p)),
        num_samples: int = typer.Option(None, help="Completions per prompt (ids become ID#k)." + _d(D.num_samples)),
        seed: int = typer.Option(None, help="Sampling seed (each sample's RNG derives from it and its id)." + _d(D.seed)),
        rationale: bool = typer.Option(None, "--rationale/--no-rationale",
                                       help="Chain-of-thought prompting; split output into rationale and answer." + _d(False, "--rationale/--no-rationale")),
        rationale_template: str = typer.Option(None, help="Prompt template with {prompt}." + _d(repr(D.rationale_template))),
        answer_pattern: str = typer.Option(None, help="Regex finding the answer (group 'answer')." + _d(repr(D.answer_pattern))),
        answer_match: str = typer.Option(None, help="Which match of the answer pattern names the answer: last or first." + _d(D.answer_match)),
        id_field: str = typer.Option(None, help="Input field holding the id." + _d(D.id_field)),
        prompt_field: str = typer.Option(None, help="Input field holding the prompt text." + _d(D.prompt_field)),
        messages_field: str = typer.Option(None, help="Input field holding chat messages." + _d(D.messages_field)),
        completion_field: str = typer.Option(None, help="Input field holding the completion." + _d(D.completion_field)),
        max_length: int = typer.Option(None, help="Longest sequence in tokens.  [default: the teacher's context]"),
        truncate: bool = typer.Option(None, "--truncate/--no-truncate",
                                      help="Cut sequences longer than the context instead of skipping them." + _d(False, "--truncate/--no-truncate")),
        max_errors: int = typer.Option(None, help="Fail after more than N bad inputs.  [default: never]"),
        device: str = typer.Option(None, help="cpu, cuda, cuda:1, or auto." + _d(D.device)),
        dtype: str = typer.Option(None, help="auto (the checkpoint's), bfloat16, float16 or float32." + _d(D.dtype)),
        batch_tokens: int = typer.Option(None, help="Padded tokens per forward batch." + _d(D.batch_tokens)),
        chunk_positions: int = typer.Option(None, help="Positions per LM-head chunk." + _d(D.chunk_positions)),
        compile: bool = typer.Option(None, "--compile/--no-compile",
                                     help="Fuse the fp32 logsumexp with torch.compile.  [default: on for CUDA]"),
        capture_kernel: str = typer.Option(None, help="Top-k and log tail: auto (the fused Triton kernel on CUDA "
                                           "when Triton is installed), triton, or torch." + _d(D.capture_kernel)),
        workers: int = typer.Option(None, help="Workers filling the store.  [default: WORLD_SIZE or 1]"),
        worker_index: int = typer.Option(None, help="This worker's index.  [default: RANK or 0]"),
        writer_id: str = typer.Option(None, help="Writer id.  [default: g<worker>-<random>]"),
        shard_records: int = typer.Option(None, help="Records per shard." + _d(D.shard_records)),
        shard_bytes: int = typer.Option(None, help="Bytes per shard (approximate)." + _d(D.shard_bytes)),
        queue_batches: int = typer.Option(None, help="Captured batches queued for the writers." + _d(D.queue_batches)),
        writer_threads: int = typer.Option(None, help="Parallel store writers (each its own shards)." + _d(D.writer_threads)),
        progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar on stderr." + _d(True, "--progress/--no-progress")),
        gpu_memory_utilization: float = typer.Option(
            None, help="vLLM GPU memory share.  [default: 0.9 on a GPU; on CPU a 1 GiB KV cache, or $VLLM_CPU_KVCACHE_SPACE GiB]"),
        tensor_parallel_size: int = typer.Option(None, help="vLLM tensor parallel size." + _d(D.tensor_parallel_size)),
        enforce_eager: bool = typer.Option(None, "--enforce-eager/--no-enforce-eager",
                                           help="vLLM: run eagerly, no compilation at start-up.  [default: on for CPU, off for GPU]"),
        threads: str = threads_option(),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Run a teacher over a prompt set and write top-k log-probs or sampled targets (+ hidden states) into a store."""
        overrides = dict(locals())
        for name in ("config", "as_json", "threads", "out"):
            overrides.pop(name)
        overrides["store"] = pick("--out", out, "--store", store)
        settings = GenerateConfig.build(config, **overrides)
        use_threads(threads)

        from potstill.teacher_gen.runner import generate as run_generate

        summary = run_generate(settings)
        typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
