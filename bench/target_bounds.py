"""Two cheaper kinds of targets, measured against a real teacher before building them into the store.

Systematic draws are close to the least error an unbiased sparse target can have for its number of
distinct ids (docs/results.md, Fidelity). Two ideas promise more per byte; this bench measures
both on a real teacher's exact distributions over held-out text, with no training:

1. **A low-rank code of the final hidden state.** The teacher's logits are W·h (h: the input of the
   output layer, W: the output layer). Store r coefficients of h per token (int8 or int4, one float16
   scale) in a basis fitted once per store, with W·basis once per store: the reader rebuilds a dense
   distribution with no sampling variance. The basis is the principal subspace of h in the metric of
   the teacher's average Fisher information, F = E_t[Wᵀ(diag p_t − p_t p_tᵀ)W], which to second
   order minimises E KL(p ‖ p̃). Fitted on half of the blocks and measured on the other half.
2. **The text's own token exact.** Each record already holds the log-prob of the token that follows
   (12 bits), so p_y is known for free: draw N systematic samples from the rest of the distribution
   and weight them by 1 − p_y. The exact marginals of systematic draws give both the error and the
   distinct ids without drawing: a token with N·p = k + f is drawn k or k + 1 times (the latter with
   probability f), so E‖p̂ − p‖² = Σ f(1 − f)/N² and E[distinct] = Σ min(1, N·p).

    python bench/target_bounds.py --teacher DIR              # a save_pretrained folder (tokenizer beside it)
    python bench/target_bounds.py --teacher $TMPDIR/potstill-fidelity-cpu/teacher \
        --tokenizer $TMPDIR/potstill-fidelity-cpu/tokenizer --ranks 16,32,48,64,96   # fidelity.py's CPU-scale teacher
    python bench/target_bounds.py --teacher DIR --blocks 64 --ranks 32,64,128,256
"""

from __future__ import annotations

import argparse
import sysconfig
import time

import fidelity_common  # the fidelity bench's corpus helpers
import numpy as np
import torch


def teacher_outputs(model_dir: str, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, p, y, W): the output layer's input at every position but each block's last, the exact
    float64 distribution there, the next token, and the output layer's weight (float64)."""
    from transformers import AutoModelForCausalLM

    from potstill.teacher_gen.capture import logit_transform

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if logit_transform(model.config) is not None:
        raise SystemExit(f"{model_dir}: the teacher transforms its logits (soft-capping): a low-rank code of h "
                         "does not give its distribution")
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise SystemExit(f"{model_dir}: the output layer has a bias; this bench assumes none")
    hs, ps, ys = [], [], []
    with torch.no_grad():
        for block in blocks:
            x = torch.from_numpy(block[None])
            h = model.model(input_ids=x).last_hidden_state[0, :-1]
            ps.append(torch.softmax(head(h).double(), -1))
            hs.append(h.double())
            ys.append(x[0, 1:])
    return torch.cat(hs), torch.cat(ps), torch.cat(ys), head.weight.detach().double()


def fisher_basis(h: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, encode, decode): with the first r columns of `encode` and rows of `decode`,
    z = (h − mean) @ encode[:, :r] and ĥ = mean + z @ decode[:r] span the r-dimensional subspace that
    keeps the most of E (h − mean)ᵀ F (h − mean)."""
    mean = h.mean(0)
    a = p @ w  # E_p[w_v] per position
    fisher = w.T @ (p.mean(0)[:, None] * w) - a.T @ a / len(p)
    e, v = torch.linalg.eigh(fisher)
    e = e.clamp_min(float(e.max()) * 1e-9)
    root, inv_root = v @ torch.diag(e.sqrt()) @ v.T, v @ torch.diag(e.rsqrt()) @ v.T
    g = (h - mean) @ root
    ge, gv = torch.linalg.eigh(g.T @ g)
    u = gv[:, ge.argsort(descending=True)]
    return mean, root @ u, u.T @ inv_root


def quantise(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token quantisation to `bits` bits with one scale per token (absmax)."""
    step = z.abs().amax(-1, keepdim=True).clamp_min(1e-30) / (2 ** (bits - 1) - 1)
    return torch.round(z / step) * step


def low_rank_rows(h: torch.Tensor, p: torch.Tensor, w: torch.Tensor, ranks: list[int], bits: list[int]) -> list[dict]:
    half = len(h) // 2  # fit on the first half of the blocks' positions, measure on the rest
    rows = []
    mean, enc, dec = fisher_basis(h[:half], p[:half], w)
    for rank in ranks:
        for b in bits:
            h_hat = mean + quantise((h[half:] - mean) @ enc[:, :rank], b) @ dec[:rank]
            log_q = torch.log_softmax(h_hat @ w.T, -1)
            pv = p[half:]
            kl = (pv * (pv.clamp_min(1e-300).log() - log_q)).sum(-1)
            # bytes: the coefficients and their float16 scale
            rows.append({"rank": rank, "bits": b, "bytes": rank * b / 8 + 2, "kl": kl.mean().item(),
                         "sq_error": (pv - log_q.exp()).square().sum(-1).mean().item()})
    return rows


def systematic_marginals(q: torch.Tensor, n: int, weight: torch.Tensor | float = 1.0) -> tuple[float, float]:
    """(E‖p̂ − p‖², E[distinct ids]) per position of n systematic draws from the rows of `q`, the
    weights of the draws being `weight`/n (exact: from the draws' marginal counts)."""
    x = n * q
    f = x - x.floor()
    weight = torch.as_tensor(weight, dtype=q.dtype).reshape(-1)
    err = weight.square() * (f * (1 - f)).sum(-1) / n**2
    return err.mean().item(), x.clamp(max=1).sum(-1).mean().item()


def exact_token_rows(p: torch.Tensor, y: torch.Tensor, draws: list[int], chunk: int = 512) -> list[dict]:
    """Per N: plain systematic draws' error and distinct ids, and the same with the text's token exact
    and the N draws from the rest (its id is the text's, so it is not counted). Rows in chunks, to
    bound the float64 temporaries at a large vocabulary."""
    sums = {n: np.zeros(4) for n in draws}
    for start in range(0, len(p), chunk):
        pc, yc = p[start : start + chunk], y[start : start + chunk]
        rows = torch.arange(len(yc))
        p_y = pc[rows, yc]
        rest = pc.clone()
        rest[rows, yc] = 0
        rest /= (1 - p_y).clamp_min(1e-300)[:, None]
        for n in draws:
            sums[n] += len(pc) * np.array([*systematic_marginals(pc, n), *systematic_marginals(rest, n, 1 - p_y)])
    out = []
    for n in draws:
        err, distinct, err_y, distinct_y = sums[n] / len(p)
        out.append({"samples": n, "distinct": distinct, "sq_error": err, "distinct_exact_y": distinct_y,
                    "sq_error_exact_y": err_y})
    return out


def at_distinct(rows: list[dict], distinct: float) -> float:
    """Plain systematic draws' error at `distinct` ids per position (log-log interpolation over N,
    within the range of `rows`)."""
    xs = np.log([r["distinct"] for r in rows])
    ys = np.log([r["sq_error"] for r in rows])
    return float(np.exp(np.interp(np.log(distinct), xs, ys)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a save_pretrained folder")
    parser.add_argument("--tokenizer", default=None, help="the teacher's tokenizer folder (default: --teacher)")
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks (half fit the basis)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ranks", default="16,32,64,128,256")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--samples", default="24,32,48,64,80,96,128,160")
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
    files = fidelity_common.corpus_files(args.corpus)
    held = fidelity_common.read_texts([f for f in files if fidelity_common.is_heldout(f, args.corpus, fidelity_common.Scale.heldout_fraction)])
    every = fidelity_common.blocks_of(held, tokenizer, args.seq)
    blocks = every[np.random.default_rng(0).permutation(len(every))[: args.blocks]]
    h, p, y, w = teacher_outputs(args.teacher, blocks)
    fidelity_common.say(f"{len(p)} positions, hidden size {h.shape[1]}, vocabulary {p.shape[1]}; "
                 f"mean p of the next token {p[torch.arange(len(y)), y].mean().item():.3f}")

    print("| coefficients r | bits | target B/scored token | KL(p ‖ p̃) | ‖p − p̃‖² |")
    print("|---:|---:|---:|---:|---:|")
    for r in low_rank_rows(h, p, w, [int(x) for x in args.ranks.split(",")], [int(x) for x in args.bits.split(",")]):
        print(f"| {r['rank']} | {r['bits']} | {r['bytes']:.0f} | {r['kl']:.4f} | {r['sq_error']:.5f} |")
    print()
    rows = exact_token_rows(p, y, [int(x) for x in args.samples.split(",")])
    print("| N | distinct ids | E‖p̂ − p‖² | with the text's token exact: distinct ids | E‖p̂ − p‖² | "
          "plain draws at those distinct ids |")
    print("|---:|---:|---:|---:|---:|---:|")
    top = max(r["distinct"] for r in rows)
    for r in rows:
        plain = f"{at_distinct(rows, r['distinct_exact_y']):.5f}" if r["distinct_exact_y"] <= top else "-"
        print(f"| {r['samples']} | {r['distinct']:.2f} | {r['sq_error']:.5f} | {r['distinct_exact_y']:.2f} | "
              f"{r['sq_error_exact_y']:.5f} | {plain} |")
    fidelity_common.say(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
