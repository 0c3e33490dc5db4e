"""Fidelity bench, `--real-teacher DIR --students` (scale `real`): the student comparison with a real
teacher (a save_pretrained folder, its tokenizer and vocabulary) and no teacher training. Full KD trains
against the teacher's exact log-probabilities at the same positions, computed once and kept as float16
in the work folder (`CachedTeacher`): the teacher is fixed, so that is the online loss without a
teacher forward at every step."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import torch
from fidelity_common import (
    Run,
    Scale,
    curves_from_json,
    curves_json,
    evaluate,
    frequency_bands,
    make_stores,
    read_json,
    say,
    split_blocks,
    store_bytes,
    store_for,
    train_students,
)
from fidelity_students import report

from potstill.store import open_store


class CachedTeacher:
    """A real teacher's log-probabilities at every position of a fixed set of blocks, computed once and
    kept as float16 in a memmap in the work folder. Called like a model (`teacher(input_ids=x,
    attention_mask=m).logits`) it gives them back as float32 (log-softmax leaves log-probabilities as
    they are), so online full KD over a fixed transfer set and the held-out metrics need no teacher
    forward per step. Rows are found by their tokens (right-padded rows by their unpadded tokens)."""

    def __init__(self, path: str, blocks: list[np.ndarray], model: Any | None) -> None:
        self.rows = {np.asarray(b, dtype=np.int64).tobytes(): i for i, b in enumerate(blocks)}
        seq = max(len(b) for b in blocks)
        vocab = model.config.vocab_size if model is not None else None
        meta = path + ".json"
        keys = hashlib.sha256(b"".join(sorted(self.rows))).hexdigest()
        saved = read_json(meta)
        if saved and saved["keys"] == keys:
            self.table = np.memmap(path, dtype=np.float16, mode="r", shape=tuple(saved["shape"]))
            return
        if model is None:
            raise SystemExit(f"{path}: no cached teacher log-probabilities for these blocks")
        from potstill.teacher_gen.capture import logit_transform

        transform = logit_transform(model.config)
        table = np.memmap(path, dtype=np.float16, mode="w+", shape=(len(blocks), seq, vocab))
        started = time.time()
        with torch.no_grad():
            for start in range(0, len(blocks), 8):
                group = [np.asarray(b, dtype=np.int64) for b in blocks[start : start + 8]]
                # A batch when the blocks are of one length (almost always), else one at a time.
                parts = [np.stack(group)] if len({len(b) for b in group}) == 1 else [b[None] for b in group]
                row = start
                for x in parts:
                    logits = model(input_ids=torch.from_numpy(x)).logits.float()
                    logits = transform(logits) if transform else logits
                    table[row : row + len(x), : x.shape[1]] = torch.log_softmax(logits, -1).numpy().astype(np.float16)
                    row += len(x)
                say(f"teacher log-probs: {row}/{len(blocks)} blocks ({time.time() - started:.0f} s)")
        table.flush()
        with open(meta, "w") as f:
            json.dump({"keys": keys, "shape": list(table.shape)}, f)
        self.table = np.memmap(path, dtype=np.float16, mode="r", shape=table.shape)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from types import SimpleNamespace

        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.table.shape[2], dtype=torch.float32)
        for b in range(batch):
            n = int(attention_mask[b].sum()) if attention_mask is not None else length
            row = self.rows[input_ids[b, :n].cpu().numpy().astype(np.int64).tobytes()]
            logits[b, :n] = torch.from_numpy(np.asarray(self.table[row, :n], dtype=np.float32))
        return SimpleNamespace(logits=logits.to(input_ids.device))


def real_students(model_dir: str, train_texts: list[str], held_texts: list[str], scale: Scale, variants: list[str],
                  workdir: str, codec: str, device: str, first_seed: int = 0) -> dict[str, Any]:
    """The student comparison with a real teacher: `potstill generate` runs the teacher over the
    transfer set into one store per offline variant; full KD (the reference) trains against the
    teacher's exact log-probabilities at the same positions (`CachedTeacher`, the teacher computed
    once: the same loss as an online teacher, which is fixed, at float16 precision of its log-probs);
    the held-out metrics use the teacher's exact distributions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scale = dataclasses.replace(scale, vocab=model.config.vocab_size)
    _, transfer, heldout = split_blocks(train_texts, held_texts, tokenizer, scale)
    say(f"real teacher {model_dir}: vocabulary {scale.vocab}; transfer set {len(transfer)} blocks, held-out eval "
        f"{len(heldout)} blocks of {scale.seq} tokens")
    offline = sorted({store_for(v) for v in variants if v not in ("ce", "full")})
    stores = make_stores(workdir, transfer, tokenizer, scale, device, offline or ["sampled12"], codec, teacher=model_dir)
    bytes_by_store = {name: store_bytes(url) for name, url in stores.items()}
    # ce and full read only the tokens: every store holds the same records in the same order, so they
    # need no store of their own (the teacher is run once less).
    stores.setdefault(store_for("full"), stores[(offline or ["sampled12"])[0]])
    # The records as the stores hold them (the prompts' text tokenized again by `potstill generate`).
    scored = [np.asarray(r.input_ids, dtype=np.int64) for r in open_store(next(iter(stores.values()))).iter_records()]
    teacher = CachedTeacher(os.path.join(workdir, "teacher-log-probs.f16"), [*scored, *heldout], model)
    del model
    teacher_eval = evaluate(teacher, teacher, heldout, device)
    say(f"teacher held-out CE {teacher_eval['ce']:.4f}, ECE {100 * teacher_eval['ece']:.2f} %")
    results, curves = train_students(variants, stores, teacher, scale, range(first_seed, first_seed + scale.seeds), device,
                                     heldout, bands=frequency_bands(np.concatenate(scored), scale.vocab))
    return {"real_teacher_students": os.path.basename(model_dir.rstrip("/")), "scale": dataclasses.asdict(scale),
            "teacher": teacher_eval, "stores": bytes_by_store, "runs": results, "curves": curves_json(curves),
            "gradient_variance": {}}


def run_real_students(run: Run, train_texts: list[str], held_texts: list[str]) -> None:
    """`--real-teacher DIR --students`: the comparison, its report, and `--json`."""
    args, scale = run.args, run.scale
    result = real_students(args.real_teacher, train_texts, held_texts, scale, run.variants, run.workdir, args.codec,
                           args.device, args.first_seed)
    run.keep_workdir()
    rows, shares, lines = report(result["runs"], result["stores"], result["teacher"], curves_from_json(result["curves"]),
                                 {}, scale.seeds, args.plots, run.scale_name)
    say(f"done in {run.minutes():.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result | {"scale_name": run.scale_name, "codec": args.codec, "threads": args.threads, "rows": rows,
                                "share_curves": shares, "verdict": lines, "minutes": run.minutes()},
                      f, indent=2)
