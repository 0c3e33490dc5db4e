"""How much of full knowledge distillation an offline store keeps.

1. A corpus that is on every machine: the Python standard library's source (`sysconfig`'s stdlib
   folder, tests and site-packages left out), split into train / held-out by a hash of each file's
   path. A byte-level BPE tokenizer is trained on the train split, locally.
2. A teacher (Llama-shaped, random init) is trained on the train split with cross-entropy.
3. The stores: `potstill generate` (the library call, the real HF capture path) scores a transfer set
   (a sample of train-split blocks) for each offline variant (`STORES`): i.i.d. sampled targets
   (`sampledN`), systematic / stratified draws (`systematicN`, `stratifiedN`), hybrid targets
   (`hybridH-systematicN`: the exact top-H plus N draws from the rest), all packed (`--codec compact`:
   the compact codec, which holds the same draws in fewer bytes); top-K (`topK`,
   unpacked) on request.
4. Students of one size, from the same initial weights, take the same steps over the same batches
   (the store loader `student_train.data.StoreDataset`, one seed for the order), with:
     ce         cross-entropy on the stored tokens only;
     full       online full-vocabulary forward KL, the teacher in the loop (the reference);
     topK[-notail]  offline top-K forward KL with the tail bucket (or renormalised over the K ids);
     the sampled kinds: offline forward KL against the loader's unbiased weights (`losses.sampled_kd`).
   Offline variants use the project's objective (`student_train.objective.distill_loss`) unchanged.
5. On held-out blocks (never in the transfer set, never seen by the teacher): the student's
   cross-entropy, full-vocabulary KL(teacher ‖ student), expected calibration error (15 equal-width
   bins of the top-1 probability), top-1 agreement with the teacher; the store's bytes per token;
   the share of full KD's gain over CE each variant keeps, (CE_ce − CE_x) / (CE_ce − CE_full), and
   the same share of the KL to the teacher; the CE share at `eval_steps` during training (the share
   against steps); and, on the full-KD student, E‖g − g*‖² / ‖g*‖² of each sampled kind's parameter
   gradient g on held-out blocks against full KD's exact gradient g*.
6. `--real-teacher DIR`: no training; each sampled kind's error E‖p̂ − p‖² against a real teacher's
   exact distributions on held-out text, with its packed and compact bytes (the gradient
   error any student's logits get).
7. `--real-teacher DIR --students` (scale `real`): steps 3-5 with a real teacher (a save_pretrained
   folder, its tokenizer and vocabulary) and no teacher training. Full KD trains against the teacher's
   exact log-probabilities at the same positions, computed once and kept as float16 in the work
   folder (`CachedTeacher`): the teacher is fixed, so that is the online loss without a teacher
   forward at every step.

    python bench/fidelity.py                          # CPU scale (~30-40 min on 2 quiet cores), 2 seeds
    python bench/fidelity.py --scale short            # a 200-step teacher, 80-step students: minutes
    python bench/fidelity.py --scale cpu-wide         # CPU scale, 4x the transfer set (1.6 epochs, not 6.25)
    python bench/fidelity.py --scale gpu --device cuda # larger scale for a GPU box
    python bench/fidelity.py --quick                  # smoke run, a few minutes
    python bench/fidelity.py --real-teacher DIR --seeds 2 --threads 1
    python bench/fidelity.py --real-teacher DIR --students --variants systematic24,systematic64 --codec compact

The students train with AdamW (β = 0.9, 0.95) and a cosine schedule down to 0.1 × the peak learning
rate; `--student-batch`, `--student-steps`, `--student-final-lr`, `--student-beta2`, `--student-head-lr`
(the output layer's learning rate, a multiple of the others'), `--student-head-beta2` (its β₂) and
`--student-head-wd` (its weight decay) change that for every variant alike. The verdict holds a variant to
the goal on every seed (docs/results.md, Fidelity). Where a gap comes from: the KL to the teacher
is also split by the ids' frequency in the transfer set (`FREQUENCY_BANDS`), next to the output
layer's AdamW second moments in the same bands, the students' probability mass on each band against
the teacher's, and their signed calibration gap (mean top-1 probability − accuracy).

The bench is this command line over one module per experiment: fidelity_students.py (the variants,
the share of full KD's gain against steps, the verdict), fidelity_gradient.py (gradient error),
fidelity_bands.py (calibration and frequency bands), fidelity_real_teacher.py (a real teacher's target
error), fidelity_real_students.py (students of a real teacher), fidelity_codec_sizes.py; the stores,
the students' training and the evaluation they share are fidelity_common.py's.

The work folder (`--workdir`) keeps the tokenizer, the teacher and the stores between runs with the
same teacher and transfer settings; `--fresh` starts over. Results: markdown tables on stdout,
`--json FILE` (and FILE.partial after each student), PNG plots with `--plots FOLDER`; `--report FILE`
prints the tables (and plots) of a saved run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sysconfig

import torch
from fidelity_codec_sizes import codec_sizes
from fidelity_common import (
    ALL_VARIANTS,
    SCALES,
    VARIANTS,
    Run,
    curves_from_json,
    eval_steps_for,
    load_corpus,
    read_json,
)
from fidelity_real_students import run_real_students
from fidelity_real_teacher import plot_real, real_teacher_table, run_real_teacher
from fidelity_students import merged_runs, report, run_students


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default=None, help="default: cpu (real with --students)")
    parser.add_argument("--quick", action="store_true", help="same as --scale quick")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default: the scale's)")
    parser.add_argument("--student-batch", type=int, default=None,
                        help="blocks per student step (default: the scale's, 16 at CPU scale)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="the students' steps (default: the scale's, 400 at CPU scale); held-out CE on the way at "
                             "1/8, 1/4, 1/2 and 3/4 of them")
    parser.add_argument("--student-final-lr", type=float, default=None,
                        help="the students' learning rate at the end, a fraction of the peak (default: the scale's, 0.1)")
    parser.add_argument("--student-beta2", type=float, default=None,
                        help="the students' AdamW second-moment decay (default: the scale's, 0.95)")
    parser.add_argument("--student-head-lr", type=float, default=None,
                        help="the students' output-layer learning rate, a multiple of the others' (default: the scale's, 1)")
    parser.add_argument("--student-head-beta2", type=float, default=None,
                        help="the output layer's AdamW second-moment decay (default: the others')")
    parser.add_argument("--student-head-wd", type=float, default=None,
                        help="the output layer's AdamW weight decay (default: the scale's, 0.1, as the others')")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (ce and full always run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codec", choices=("packed", "compact"), default="packed",
                        help="codec of the sampled stores (top-K stores are unpacked)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="default: $TMPDIR/potstill-fidelity-<scale>")
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--fresh", action="store_true", help="retrain the tokenizer and teacher, regenerate the stores")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first student seed: runs of seeds 0..k-1 and k..n-1 together are a run of n seeds")
    parser.add_argument("--report", default=None, metavar="JSON[,JSON...]",
                        help="print the tables (and with --plots draw the plots) of a finished run's --json file, no "
                             "run; several files of the same settings and other seeds report as one run")
    parser.add_argument("--real-teacher", default=None, metavar="DIR",
                        help="only measure the sampled targets' error against a real teacher's exact distributions "
                             "(a save_pretrained folder) on held-out text, no training")
    parser.add_argument("--students", action="store_true",
                        help="with --real-teacher: train students from the real teacher's stores (scale real) "
                             "instead of measuring target error only")
    parser.add_argument("--real-blocks", type=int, default=8, help="--real-teacher: held-out blocks of --real-seq tokens")
    parser.add_argument("--real-seq", type=int, default=128)
    parser.add_argument("--codec-sizes", action="store_true",
                        help="only write every sampled store of the work folder again in each codec and print the "
                             "target bytes per token (no training)")
    parser.add_argument("--plots", default=None,
                        help="folder for the PNG plots (share of full KD's gain against steps, gradient variance)")
    args = parser.parse_args()
    if args.report:
        saved = merged_runs(args.report.split(","))
        if "real_teacher" in saved:  # target error only (no students)
            print(real_teacher_table(saved["runs"]))
            if args.plots:
                plot_real(saved["runs"], args.plots, saved["real_teacher"])
            return
        report(saved["runs"], saved["stores"], saved["teacher"],
               curves_from_json(saved["curves"]),
               saved["gradient_variance"], len(saved["runs"]["ce"]), args.plots, saved["scale_name"])
        return
    unknown = sorted(set(args.variants.split(",")) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    variants = [v for v in ALL_VARIANTS if v in {"ce", "full", *args.variants.split(",")}]
    if args.students and not args.real_teacher:
        parser.error("--students needs --real-teacher DIR")
    if any(n is not None and n < 1 for n in (args.seeds, args.student_batch, args.student_steps)):
        parser.error("--seeds, --student-batch and --student-steps must be at least 1")
    scale_name = "quick" if args.quick else args.scale or ("real" if args.students else "cpu")
    overrides = {"seeds": args.seeds, "student_batch": args.student_batch, "student_steps": args.student_steps,
                 "student_final_lr": args.student_final_lr, "student_beta2": args.student_beta2,
                 "student_head_lr": args.student_head_lr, "student_head_beta2": args.student_head_beta2,
                 "student_head_wd": args.student_head_wd}
    scale = dataclasses.replace(SCALES[scale_name], **{k: v for k, v in overrides.items() if v is not None})
    if args.student_steps is not None:
        scale = dataclasses.replace(scale, eval_steps=eval_steps_for(args.student_steps))
    workdir = args.workdir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"potstill-fidelity-{scale_name}")
    if args.codec_sizes:
        print(codec_sizes(workdir))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # What the cached tokenizer, teacher and stores depend on (not the students' settings).
    settings = {k: v for k, v in dataclasses.asdict(scale).items()
                if k == "vocab" or k == "seq" or k.startswith(("teacher_", "transfer_", "heldout_", "tokenizer_"))}
    settings["corpus"] = args.corpus
    if args.students:
        settings["real_teacher"] = os.path.abspath(args.real_teacher)
    # --real-teacher without --students uses no work folder
    if (args.students or not args.real_teacher) and (args.fresh or read_json(os.path.join(workdir, "settings.json")) != settings):
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
    run = Run(args, scale, scale_name, variants, workdir, settings)
    train_texts, held_texts = load_corpus(args.corpus, scale.heldout_fraction)
    if args.students:
        run_real_students(run, train_texts, held_texts)
    elif args.real_teacher:
        run_real_teacher(run, held_texts)
    else:
        run_students(run, train_texts, held_texts)


if __name__ == "__main__":
    main()
