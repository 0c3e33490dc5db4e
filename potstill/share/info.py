"""What a store holds, for `potstill store info`: identity, shape and bytes by field."""

from __future__ import annotations

from typing import Any

from potstill.store.errors import StoreError
from potstill.store.provenance import store_job_status
from potstill.store.reader import Store
from potstill.store.sizes import store_sizes
from potstill.store.targets import codec_named


def store_info(store: Store) -> dict[str, Any]:
    m = store.manifest
    field_bytes: dict[str, int] = {}
    for commit in store.commits:
        for name, size in commit.field_bytes.items():
            field_bytes[name] = field_bytes.get(name, 0) + size
    sizes = store_sizes(store)
    tokens, scored = store.num_tokens, store.num_scored_tokens

    def per(total: int, count: int) -> float | None:
        return round(total / count, 3) if count else None

    problems = [f"commits/{shard}.json: {why}" for shard, why in store.bad_commits]
    if store.num_duplicates:
        problems.append(f"{store.num_duplicates} record(s) repeat an id committed earlier (readers skip them)")
    job, runs = store_job_status(store)
    return {
        "store": store.url,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "potstill_version": m.potstill_version,
        "teacher": vars(m.teacher),
        "tokenizer": {"fingerprint": m.tokenizer.fingerprint, "vocab_size": m.tokenizer.vocab_size},
        "targets": m.targets.to_dict(),
        "tail": describe_tail(m.targets.to_dict()),
        "hidden_layers": [vars(layer) for layer in m.hidden.layers],
        "rationales": m.rationales,
        "answers": count_answers(store) if m.rationales else None,
        "answer_rule": ({"pattern": m.generation.get("answer_pattern"),
                         "match": m.generation.get("answer_match", "last")}  # "last": the rule before the option
                        if m.rationales and m.generation.get("answer_pattern") else None),
        "shards": len(store.commits),
        "records": store.num_records - store.num_duplicates,
        "duplicates": store.num_duplicates,
        "tokens": tokens,
        "scored_tokens": scored,
        # the one meaning of each byte figure (`potstill.store.sizes`): everything the store lists, per token
        "bytes": sizes.total,
        "bytes_per_token": sizes.per_token(),
        "bytes_per_scored_token": sizes.per_scored_token(),
        "target_bytes_per_scored_token": sizes.per_scored_token("targets"),
        "sizes": sizes.to_dict(),
        "sizes_line": sizes.describe(),
        # info reads only the commit records: it never hashes a file (`potstill store verify` does)
        "verified": False,
        "problems": problems,
        "provenance": m.provenance or None,  # format §10: absent from stores made before it
        "job": None if job is None else job.to_dict(),
        "job_lines": [] if job is None else job.lines(),
        "runs": len(runs.runs),
        "run_warnings": runs.warnings,
        "fields": {
            name: {"bytes": size, "per_token": per(size, tokens), "per_scored_token": per(size, scored)}
            for name, size in sorted(field_bytes.items())
        },
    }


def format_info(info: dict[str, Any]) -> str:
    t = info["teacher"]
    empty = not info["tokens"]  # nothing committed yet: no per-token sizes, no answers, no field table
    lines = [
        f"store        {info['store']}  (format {info['format_version']}, potstill {info['potstill_version']})",
        f"teacher      {t['name_or_path']}  ({t['architecture']}, {t['dtype']}, config {str(t['config_hash'])[:19]})",
        f"tokenizer    {info['tokenizer']['fingerprint'][:23]}  vocab {info['tokenizer']['vocab_size']}",
        f"targets      {describe_targets(info['targets'])}",
        *([f"tail         {info['tail']}"] if info.get("tail") else []),
        "hidden       "
        + (", ".join(f"layer {x['index']} [{x['width']}] {x['dtype']}" for x in info["hidden_layers"]) or "none"),
        f"rationales   {'yes' if info['rationales'] else 'no'}",
        *([f"answers      {describe_answers(info['answers'])}"] if info.get("answers") and not empty else []),
        *([f"answer rule  the {info['answer_rule']['match']} match of {info['answer_rule']['pattern']!r}"]
          if info.get("answer_rule") else []),
        f"shards       {info['shards']}",
        f"records      {info['records']}" + (f" ({info['duplicates']} duplicate rows skipped)" if info["duplicates"] else "")
        + (" (no records yet)" if empty else ""),
        f"tokens       {info['tokens']} ({info['scored_tokens']} scored)",
        f"bytes        {info['sizes_line']}",
        "integrity    not verified (`potstill store verify` hashes every file)"
        + (f"; {len(info['problems'])} problem(s) found:" if info["problems"] else ""),
        *(f"  BAD  {p}" for p in info["problems"]),
        *provenance_lines(info),
    ]
    if empty:
        return "\n".join(lines)
    lines += ["", f"{'field':<22}{'bytes':>14}{'B/token':>12}{'B/scored':>12}"]
    for name, f in info["fields"].items():
        lines.append(f"{name:<22}{f['bytes']:>14}{_fmt(f['per_token']):>12}{_fmt(f['per_scored_token']):>12}")
    return "\n".join(lines)


def provenance_lines(info: dict[str, Any]) -> list[str]:
    """`store info`'s lines for `provenance_rows`: a label column, continuation rows indented."""
    return [f"{label:<13}{text}" if label else f"  {text}" for label, text in provenance_rows(info)]


def provenance_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows: where the store came from and how complete its job is (format §10); none for a
    store made before either was recorded. A row with no label continues the one above."""
    rows: list[tuple[str, str]] = []
    p = info.get("provenance")
    if p:
        teacher = p.get("teacher") or {}
        files = teacher.get("files") if isinstance(teacher.get("files"), list) else None
        which = (f"revision {teacher['revision']}" if teacher.get("revision")
                 else f"{str(teacher.get('sha256'))[:23]}" if teacher.get("sha256")
                 else f"local, {len(files)} files" if files is not None else "revision not known")
        rows.append(("provenance", f"teacher {teacher.get('name')} ({which}); created {p.get('created')} by potstill "
                                   f"{p.get('potstill_version')}"))
        prompts = p.get("prompts") or {}
        if prompts:
            rows.append(("", f"prompts {prompts.get('count')} ({str(prompts.get('fingerprint'))[:23]}), "
                             f"{prompts.get('num_samples')} sample(s) each, when created"))
        rows.append(("licence", f"{p.get('license') or 'not given (--license)'}; the teacher's: "
                                f"{p.get('teacher_license') or 'not stated by its model card'}"))
    if info.get("job_lines"):
        first, *rest = info["job_lines"]
        rows.append(("job", first))
        rows += [("", line) for line in rest]
    if info.get("runs"):
        running = len(info["job"]["running"]) if info.get("job") else 0
        rows.append(("runs", f"{info['runs']} recorded in runs/" + (f" ({running} running or killed)" if running else "")))
    rows += [("", f"warning: {w}") for w in info.get("run_warnings", [])]
    return rows


def count_answers(store: Store) -> dict[str, Any]:
    """How many records of a rationale store hold an answer (the rest are all rationale: no answer
    line was found in their completion). Reads the `answer` column of each shard (no hashing);
    duplicate rows are not counted."""
    with_answer = records = 0
    unreadable: list[str] = []
    for commit in store.commits:
        try:
            column = store.shard(commit.shard).views.batch.column("answer")
        except StoreError as e:
            unreadable.append(f"{commit.shard}: {e}")
            continue
        present = column.is_valid().to_numpy(zero_copy_only=False)
        for row in store.duplicate_rows(commit.shard):
            present[row] = False
        records += commit.records - len(store.duplicate_rows(commit.shard))
        with_answer += int(present.sum())
    return {"with_answer": with_answer, "records": records, "unreadable_shards": unreadable}


def describe_answers(a: dict[str, Any]) -> str:
    line = f"{a['with_answer']} of {a['records']} records hold an answer"
    if a["records"] > a["with_answer"]:
        line += " (the others: no answer found, the whole completion is their rationale)"
    if a["unreadable_shards"]:
        line += f"; {len(a['unreadable_shards'])} shard(s) unreadable, not counted"
    return line


def describe_targets(t: dict[str, Any]) -> str:
    """One line: what each scored position carries and how it is encoded."""
    packed = t.get("codec", "none") != "none"
    parts = []
    if t["kind"] in ("topk", "both", "hybrid"):
        lp = f"{t['logprob_bits']}-bit log-probs (max error {t['logprob_max_error']:.2g})" if packed else f"{t['logprob_dtype']} log-probs"
        parts.append(f"top-K={t['k']}, {lp} + log tail")
    if t["kind"] in ("sampled", "both", "hybrid"):
        sampler = t["sampler"]
        rest = " from the rest" if t["kind"] == "hybrid" else ""
        parts.append(f"sampled N={t['samples']}{rest} ({sampler} draws, ids + counts, seed {t['seed']})")
    if t.get("codec") and codec_named(t["codec"]).sampled_only:
        how = " (Rice parameter by rank)"
        if t.get("id_order"):
            how += f" in an id order of {len(t['id_order'])} frequent tokens first"
        codec = f"{t['codec']} codec: sampled ids gap-coded{how}, counts gamma-coded, {t['id_bits']}-bit top-K ids"
    elif packed:
        codec = f"packed codec: {t['id_bits']}-bit ids" + (f", {t['count_bits']}-bit counts" if t.get("count_bits") else "")
    else:
        codec = "unpacked"
    return " and ".join(parts) + f"; {codec}"


def describe_tail(t: dict[str, Any]) -> str | None:
    """How exact the stored tails (the mass outside the top-K) are, in one line (format §4.4)."""
    if t["kind"] not in ("topk", "both", "hybrid"):
        return None
    if t["tail_logprob"] == "direct":
        return "exact: log of the mass outside the top-K, from logsumexp of the other logits (float32)"
    return ("log(1 − Σ top-K) in float64 from the top-K log-probs the backend returned: approximate "
            "below ~1e-6 (their float32 rounding), −inf where it rounds to 0")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
