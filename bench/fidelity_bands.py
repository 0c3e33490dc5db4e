"""Fidelity bench, calibration and frequency bands: where each variant's students differ from full KD's,
by the ids' frequency in the transfer set, and their signed calibration gap."""

from __future__ import annotations

import itertools

from fidelity_common import FREQUENCY_BANDS, pm


def band_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Where each variant's students differ from full KD's, by the ids' frequency band: the KL to the
    teacher's terms of the band's ids minus full KD's, and the RMS of the output layer's AdamW second
    moment over the band's rows as a multiple of full KD's (both paired per seed); then each variant's
    signed calibration gap and its students' probability mass per band minus the teacher's. Empty (or
    without the second table) for runs saved before these were measured."""
    if "kl_band0" not in results["full"][0]:
        return ""
    edges = [0, *FREQUENCY_BANDS, None]
    names = [f"{a:,}–{b:,}" if b else f"{a:,}+" for a, b in itertools.pairwise(edges)]
    full = results["full"]
    lines = ["| variant | " + " | ".join(f"KL − full KD's, ids {n}" for n in names) + " | "
             + " | ".join(f"head RMS / full KD's, ids {n}" for n in names) + " |", "|---|" + "---:|" * 2 * len(names)]
    for variant, runs in results.items():
        if variant == "full":
            continue
        kl = [pm([r[f"kl_band{b}"] - f[f"kl_band{b}"] for r, f in zip(runs, full, strict=True)], 1, "+.4f")
              for b in range(len(names))]
        rms = [pm([r[f"head_rms_band{b}"] / f[f"head_rms_band{b}"] for r, f in zip(runs, full, strict=True)], 1, ".2f")
               for b in range(len(names))]
        lines.append(f"| {variant} | " + " | ".join(kl) + " | " + " | ".join(rms) + " |")
    if "mass_band0" not in full[0]:
        return "\n".join(lines)
    # Where each variant's students put their probability against the teacher, and whether they are
    # over-confident (mean top-1 probability above the accuracy) or under-confident.
    lines += ["", "| variant | top-1 probability − accuracy, % | "
              + " | ".join(f"mass − teacher's, ids {n}, %" for n in names) + " |", "|---|---:|" + "---:|" * len(names)]
    for variant, runs in results.items():
        mass = [pm([r[f"mass_band{b}"] for r in runs], 100, "+.2f") for b in range(len(names))]
        lines.append(f"| {variant} | {pm([r['overconfidence'] for r in runs], 100, '+.2f')} | " + " | ".join(mass) + " |")
    return "\n".join(lines)
