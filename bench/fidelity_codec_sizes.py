"""Fidelity bench, `--codec-sizes`: every sampled store of the work folder written again in each codec."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from fidelity_common import STORES, say

from potstill.share import store_info
from potstill.store import open_store


def codec_sizes(workdir: str) -> str:
    """Markdown: the target bytes per token of every sampled store in the work folder, written again
    in each codec (real stores, `store_info`'s count). The draws are the same in every codec: they
    are lossless, which this checks record by record. The compact codec's id order is made as `potstill
    generate` makes it, from the tokens of the text the store scores."""
    import tempfile

    from potstill.store import create_store
    from potstill.store.codec import IdOrder, bits_for

    found = {}
    for entry in sorted(os.listdir(os.path.join(workdir, "stores"))):
        name = entry.split(".")[0]
        if STORES.get(name, {}).get("targets") == "sampled" and name not in found:
            found[name] = os.path.join(workdir, "stores", entry)
    lines = ["| store | distinct ids per position | packed | compact | compact / packed |",
             "|---|---:|---:|---:|---:|"]
    for name, url in sorted(found.items(), key=lambda kv: STORES[kv[0]]["samples"]):
        source = open_store(url)
        records = list(source.iter_records())
        spec = source.manifest.targets
        sizes = {}
        for codec in ("packed", "compact"):
            order = IdOrder.from_tokens([r.input_ids for r in records]) if codec == "compact" else None
            targets = dataclasses.replace(spec, codec=codec, count_bits=bits_for(spec.samples) if codec == "packed" else None,
                                          id_order=order)
            with tempfile.TemporaryDirectory(prefix="potstill-sizes-") as tmp:
                store = create_store(os.path.join(tmp, "s.store"), dataclasses.replace(source.manifest, targets=targets))
                with store.writer("w0", shard_records=1 << 20) as w:
                    for r in records:
                        w.write(r)
                sizes[codec] = store_info(open_store(store.url))["target_bytes_per_scored_token"]
                for a, b in zip(records, open_store(store.url).iter_records(), strict=True):
                    assert a.id == b.id and np.array_equal(a.sampled.ids, b.sampled.ids) and np.array_equal(
                        a.sampled.counts, b.sampled.counts), f"{name} in {codec}: record {a.id} reads back otherwise"
        distinct = sum(r.sampled.num_entries for r in records) / sum(r.sampled.num_positions for r in records)
        lines.append(f"| {name} | {distinct:.2f} | {sizes['packed']:.1f} | {sizes['compact']:.1f} | "
                     f"{sizes['compact'] / sizes['packed']:.2f} |")
        say(f"sizes: {lines[-1]}")
    return "\n".join(lines)
