"""CPU testbed: every method and baseline on the demo, scored against ground truth; and the papers' claims.

    python -m demo.testbed                       # all methods on the sketch target; table + figure in demo/results
    python -m demo.testbed --methods cdc finetune --iter 100 --styles sunglasses
    python -m demo.testbed --schedule paper --jobs 2 --round-trip   # the claims sweep (demo/results/claims.md)

Each run is a method's own script in demo mode (`--demo`: the shipped toy-face source, the demo's toy
networks and settings) in a subprocess, into <work-dir>/<run>. Then its final g_ema and the source g_ema
draw the same latents with the same noise, and the toy network (demo/toynet.py) scores them:

    FD        Frechet distance to 1000 renders of the full target distribution (lower: closer to the domain)
    IC-div    intra-cluster diversity around the run's training images (higher: less memorisation / collapse)
    IC-div10  the same around the style's ten targets at every --shots (IC-div grows as k shrinks: fewer,
              larger clusters), the column that compares runs across shots; equal to IC-div at 10 shots
    geom err  mean change of the face's geometry (positions, size, pose, gaze, mouth) from G_s(z) to G_t(z), in
              units of its spread over faces (lower: better correspondence; 0 same geometry, 1.13 unrelated faces)
    p(target) mean probability the toy network gives the target style (higher: further into the domain)
    s/iter    wall time of the whole run (set-up such as RSSA's inversion included) per iteration, this machine

With --round-trip, CDC, RSSA and progressive ASC also run the reconstruction round trip of the progressive
ASC paper (Table 2): adapt with 5 shots, then adapt that generator back to the source style from 5 source
renders with the same method; the source and the round-trip generator draw the same latents and
    RT MSE    mean squared pixel difference (images in [-1, 1]; lower: better reconstruction)
    RT cos    mean cosine similarity of their toy-network embeddings (higher: better)
    RT geom   their geometry error (lower: better)
(the paper's LPIPS needs VGG weights this machine lacks; the toy network's embedding stands in for it).

--schedule demo runs each method for its demo schedule (1500 iterations; DiFa and NADA 301); --schedule paper
for its official count (PAPER_ITERS). --seeds, --shots and --styles span a grid: the k training images of a
run are drawn from the style's ten demo targets (demo/targets/<style>), fixed per seed (all ten at 10 shots;
DiFa and NADA always take the first, they are one-shot). A run whose folder already holds a finished run
(testbed.json) is scored, not trained again; an interrupted one continues from its last checkpoint, so a long
sweep can be stopped and started again. --jobs N trains N runs at a time, one thread each.
The rows cdc_scaled, c3_scaled, rssa_scaled and progressive_asc_scaled run those methods with their
resolution-dependent settings scaled to the demo's 32 px (docs/demo-and-testbed.md, "The testbed's scale"); like
CDC's ablations they run only when --methods names them.

Every scored run also leaves a score file that outlives its run folder, in --scores (default
demo/results/scores): <style>-<k>shot-<method>-s<seed>-<schedule>.json, k the images it trained on (1 for DiFa
and NADA, 0 for the text rows), schedule "demo", "paper" or "<N>it" (--iter N); it holds the row's numbers, the
method, style, shots, seed, schedule, --n-eval, the commit of the tree that trained it (recorded in testbed.json
when the testbed started the run; else "unknown; scored at <HEAD>") and the dates. A finished run folder is
scored and refreshes its file; without one, --reuse reads the file, so the tables, the claims and the
IC-div10 plot need no run folder. Beside each score file a picture (<same name>.png) holds the run's row of
the comparison figure, so the figure needs none either; the sample grids do (skipped, with a note).
--backfill-from results-paper.md writes the score files of a committed one-seed table.

Rows "source (no adaptation)" and "target renders" (another 1000 renders: the floor of FD, the diversity of
the real distribution) frame the numbers; they need no run. Over several seeds a cell is "mean ± std (n)", the
seeds' sample std and how many seeds ran; a plain number is one seed. The claims' verdicts follow VERDICT_RULE:
with seeds on both sides a difference counts only beyond twice its standard error. Writes to --out:
results.md, comparison.png (rows: source, then each method, the same ten latents in every row; one per style:
comparison_<style>.png for styles other than sketch), samples_<method>.png (each run's last sample grid: source
left, adapted right), icdiv_vs_shots.png with several --shots, and claims-demo.md; with --schedule paper the
same names with "-paper" (results-paper.md, ...) and claims.md.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import runtime  # noqa: E402
from demo import toyfaces  # noqa: E402
from demo.toynet import frechet_distance, geometry_error, intra_cluster_diversity, load_toynet, toy_outputs  # noqa: E402
from evaluate import load_generator  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402

# name -> (script, extra arguments); "finetune" is CDC's loop with L_dist off and an image-level D on every
# iteration, i.e. the TGAN fine-tuning baseline of the papers
METHODS = {
    "finetune": ("cdc.py", ["--no-dist", "--adv", "image"]),
    "cdc": ("cdc.py", []),
    "c3": ("c3.py", []),
    "rssa": ("rssa.py", []),
    "progressive_asc": ("progressive_asc.py", []),
    "difa": ("difa.py", []),
    # zero-shot DiFa and the StyleGAN-NADA baseline (difa.py --baseline nada), one-shot from the same sketch and from text
    "difa_text": ("difa.py", ["--prompt-template", "{}", "--source-text", "a photo of a face"]),
    "nada": ("difa.py", ["--baseline", "nada"]),
    "nada_text": ("difa.py", ["--baseline", "nada", "--prompt-template", "{}", "--source-text", "a photo of a face"]),
    # the papers' baselines (baselines.py); "tgan" is the same method as "finetune" with other random draws
    "tgan": ("baselines.py", ["--baseline", "tgan"]),
    "ada": ("baselines.py", ["--baseline", "ada"]),
    "freezed": ("baselines.py", ["--baseline", "freezed"]),
    "ewc": ("baselines.py", ["--baseline", "ewc"]),
    "bsa": ("baselines.py", ["--baseline", "bsa"]),
    "minegan": ("baselines.py", ["--baseline", "minegan"]),
    # CDC's ablations (paper Fig. 5): only the image-level D, only the patch-level D, no L_dist (both Ds)
    "cdc_image": ("cdc.py", ["--adv", "image"]),
    "cdc_patch": ("cdc.py", ["--adv", "patch"]),
    "cdc_nodist": ("cdc.py", ["--no-dist"]),
    # the scale question (docs/demo-and-testbed.md, "The testbed's scale"): the 32-px settings whose depth and receptive
    # field best match each method's defaults at 256 px, declared from the networks' geometry before any run. --highp 2:
    # the patch D also reads D's 16x16 map (8 px, a quarter of the image; the default 32x32 map sees 3 px here, 50 of
    # 256 px at 256 px); progressive ASC also on 8^2..16^2 (to-half), a 2-px Farneback window and no Sobel blur
    "cdc_scaled": ("cdc.py", ["--highp", "2"]),
    "c3_scaled": ("c3.py", ["--highp", "2"]),
    "rssa_scaled": ("rssa.py", ["--highp", "2"]),
    "progressive_asc_scaled": ("progressive_asc.py", ["--highp", "2", "--asc-layers", "to-half", "--winsize", "2", "--blur", "1"]),
}
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("cdc_") and not m.endswith("_scaled")]
ONE_SHOT = ("difa", "nada")  # trained on the first training image only
ZERO_SHOT = ("difa_text", "nada_text")
# the text target of the zero-shot rows, per style: the toy CLIP's own caption of that style (demo/toyclip.py)
TEXT_TARGETS = {"sketch": "a pencil sketch of a face", "sunglasses": "a photo of a face with sunglasses"}
# --schedule paper: each script's own default iterations (its module docstring says where each comes from):
# CDC's and progressive ASC's official 5002 (C3 and the baselines share CDC's loop and schedule), RSSA's face
# preset, DiFa's and NADA's 301, BSA's 10000
PAPER_ITERS = {**{m: 5002 for m in METHODS}, "rssa": 2001, "rssa_scaled": 2001, "bsa": 10000, **{m: 301 for m in ONE_SHOT + ZERO_SHOT}}
ROUND_TRIP = ("cdc", "rssa", "progressive_asc")  # the progressive ASC paper's Table 2 compares these
ROUND_TRIP_SHOTS = 5
RESULTS_DIR = os.path.join(ROOT, "demo", "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="run every method on the demo and score it with the toy network")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                   help="which runs, trained in this order (default: all but CDC's ablations cdc_image, cdc_patch, cdc_nodist "
                        "and the *_scaled rows)")
    p.add_argument("--styles", nargs="+", choices=toyfaces.TARGET_STYLES, default=["sketch"], help="target domains (default sketch)")
    p.add_argument("--shots", nargs="+", type=int, default=[10], help="training images per run, 1-10 (default 10)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], help="seed of each repeat: the run's --seed and its draw of training images")
    p.add_argument("--schedule", choices=["demo", "paper"], default="demo",
                   help="iterations: each method's demo default, or its official count (PAPER_ITERS)")
    p.add_argument("--iter", type=int, default=None, help="iterations of every run, in place of --schedule's")
    p.add_argument("--round-trip", action="store_true",
                   help=f"also the round trip (source -> target -> source, {ROUND_TRIP_SHOTS} shots each way) of {', '.join(ROUND_TRIP)} among --methods")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, one thread each when more than one (default 1)")
    p.add_argument("--n-eval", type=int, default=1000, help="generated images and target renders per metric")
    p.add_argument("--work-dir", default=os.path.join("runs", "testbed"), help="run folders")
    p.add_argument("--out", default=RESULTS_DIR, help="tables and figures")
    p.add_argument("--scores", default=os.path.join(RESULTS_DIR, "scores"), help="score files, one per scored run (default demo/results/scores)")
    p.add_argument("--backfill-from", metavar="RESULTS_MD",
                   help="only write the score files of the runs of a one-seed results table (results.md, results-paper.md) and stop")
    p.add_argument("--extra", action="append", default=[], metavar="METHOD=ARGS",
                   help="extra arguments for one method, e.g. rssa=--lpips-random-backbone (repeatable)")
    p.add_argument("--reuse", action="store_true", help="only score: train nothing, report runs that are not finished")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not all(1 <= k <= len(toyfaces.TARGET_SEEDS) for k in args.shots):
        raise common.UserError(f"--shots must be between 1 and {len(toyfaces.TARGET_SEEDS)}, got {args.shots}")
    if args.jobs < 1:
        raise common.UserError(f"--jobs must be at least 1, got {args.jobs}")
    return args


class Run:
    """One training run of the grid: method, style, shots, seed; `back` for the return leg of a round trip."""

    def __init__(self, name, style, shots, seed, back=False):
        self.name, self.style, self.seed, self.back = name, style, seed, back
        self.shots = 1 if name in ONE_SHOT else 0 if name in ZERO_SHOT else shots

    def folder(self, args):
        """<work-dir>/<name>-<style>[-<k>shot][-seed<s>][-paper|-<n>it][-back]: the default grid keeps the plain names."""
        name = f"{self.name}-{self.style}"
        if self.name not in ONE_SHOT + ZERO_SHOT and self.shots != len(toyfaces.TARGET_SEEDS):
            name += f"-{self.shots}shot"
        if self.seed != 1:
            name += f"-seed{self.seed}"
        if args.iter is not None:
            name += f"-{args.iter}it"
        elif args.schedule == "paper":
            name += "-paper"
        return os.path.join(args.work_dir, name + ("-back" if self.back else ""))

    def iters(self, args):
        return args.iter if args.iter is not None else PAPER_ITERS[self.name] if args.schedule == "paper" else None


def training_images(style, shots, seed):
    """The k training images of a run: file paths among demo/targets/<style> (all ten at 10 shots; drawn
    without replacement by the seed otherwise, so every method of a seed trains on the same images)."""
    folder = os.path.join(runtime.DEMO_DIR, "targets", style)
    names = sorted(common.list_images(folder))
    if shots == len(names):
        return names
    chosen = np.random.default_rng(seed).choice(len(names), shots, replace=False)
    return [names[k] for k in sorted(chosen)]


def paths(run):
    """The image files a (forward) run trains on: DiFa's and NADA's first sketch, else its k drawn targets."""
    if run.name in ONE_SHOT:
        return [os.path.join(runtime.DEMO_DIR, "targets", run.style, "00.png")]
    return training_images(run.style, run.shots, run.seed)


def target_argument(run, args):
    """--target of a run: a folder (the demo's own, or a work-dir folder holding the drawn k images), or one
    image for the one-shot methods; for a round trip's return leg, ROUND_TRIP_SHOTS source-style renders."""
    if run.back:
        folder = os.path.join(args.work_dir, "targets", f"source-{ROUND_TRIP_SHOTS}shot-seed{run.seed}")
        seeds = toyfaces.TARGET_SEEDS[:ROUND_TRIP_SHOTS]
        images = [toyfaces.render_seed(s, "source", args.size) for s in seeds]  # the source's faces of the target seeds
        os.makedirs(folder, exist_ok=True)
        for k, image in enumerate(images):
            cv2.imwrite(os.path.join(folder, f"{k:02d}.png"), image[..., ::-1])
        return folder
    images = paths(run)
    if run.name in ONE_SHOT:
        return images[0]
    if len(images) == len(toyfaces.TARGET_SEEDS):
        return os.path.dirname(images[0])
    folder = os.path.join(args.work_dir, "targets", f"{run.style}-{run.shots}shot-seed{run.seed}")
    os.makedirs(folder, exist_ok=True)
    for path in images:
        shutil.copy(path, folder)
    return folder


def run_method(run, args, source=None):
    """Train one run in demo mode in a subprocess (continuing it from its last checkpoint if it was stopped);
    returns (seconds, iterations, error line or None). `source`: the checkpoint to adapt (the demo's by default)."""
    script, extra = METHODS[run.name]
    out = run.folder(args)
    command = [sys.executable, os.path.join(ROOT, script), "--demo", "--out", out, "--device", args.device]
    started_before = os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints"))
    if started_before:
        command += ["--resume"]  # the run keeps its settings; the testbed gives only the schedule again
    else:
        command += ["--overwrite", "--seed", str(run.seed), *extra]  # the testbed owns its run folders
        if run.name in ZERO_SHOT:
            command += ["--target-text", TEXT_TARGETS[run.style]]
        else:
            command += ["--target", target_argument(run, args)]
        if source is not None:
            command += ["--source", source]
        for item in args.extra:
            method, _, more = item.partition("=")
            if method == run.name:
                command += more.split()
    iters = run.iters(args)
    if iters is not None:
        command += ["--iter", str(iters), "--save-every", str(min(iters, 500))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if args.jobs > 1 else None
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.time() - started
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if result.returncode != 0:
        return seconds, 0, lines[-1] if lines else f"exit {result.returncode}"
    state = runtime.load_training_checkpoint(runtime.RunDir(out).latest_checkpoint())
    return seconds, int(state["iter"]), None


def finished(run, args):
    """(seconds, iterations[, commit]) of a finished run folder (its testbed.json; runs from before the commit
    was recorded have none), else None."""
    timing = os.path.join(run.folder(args), "testbed.json")
    if not os.path.exists(timing):
        return None
    with open(timing) as f:
        return tuple(json.load(f))


def git_commit(*paths):
    """HEAD of this clone, "+ uncommitted changes" when tracked files (of `paths`, default all) differ from it;
    "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def train(run, args, source=None):
    """Train `run` unless its folder holds a finished run; returns an error line or None."""
    if finished(run, args) is not None:
        return None
    if args.reuse:
        return "not run yet"
    print(f"testbed: {os.path.basename(run.folder(args))} ...", file=sys.stderr, flush=True)
    commit = git_commit()  # the tree this (last) start of the run trains with
    seconds, iters, error = run_method(run, args, source)
    if error is None:
        with open(os.path.join(run.folder(args), "testbed.json"), "w") as f:
            json.dump([seconds, iters, commit], f)
    print(f"testbed: {os.path.basename(run.folder(args))}: " + (error or f"{iters} iterations, {seconds:.0f} s"), file=sys.stderr, flush=True)
    return error


ROUND_TRIP_COLUMNS = ("RT MSE", "RT cos", "RT geom")


def schedule_tag(args):
    return f"{args.iter}it" if args.iter is not None else args.schedule


def scores_path(run, args):
    """<scores>/<style>-<k>shot-<method>-s<seed>-<demo|paper|Nit>.json: a (forward) run's score file."""
    return os.path.join(args.scores, f"{run.style}-{run.shots}shot-{run.name}-s{run.seed}-{schedule_tag(args)}.json")


def read_scores(run, args):
    """The run's score file as written by write_scores, or None without one (or one scored on another
    --n-eval: another measurement)."""
    path = scores_path(run, args)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record["n_eval"] != args.n_eval:
        print(f"testbed: {path} left out: scored on {record['n_eval']} latents, not {args.n_eval}", file=sys.stderr)
        return None
    return record


def pictures_path(run, args):
    """The score file's picture: the run's row of the comparison figure (its g_ema on the figure's ten latents,
    side by side with 2-px borders, at the network's resolution), so --reuse draws the figure without the run."""
    return scores_path(run, args)[:-len(".json")] + ".png"


def read_pictures(run, args):
    """The run's comparison row [h, w, 3] uint8 RGB, or None without a picture file."""
    path = pictures_path(run, args)
    return cv2.imread(path)[..., ::-1] if os.path.exists(path) else None


def write_scores(run, args, values, commit, trained):
    """Write the run's score file; returns the numbers written. When this scoring left out the round trip
    (no --round-trip, or no return-leg folder) the file keeps the round-trip numbers of the same run
    (same iterations and s/iter, i.e. the same testbed.json)."""
    old = read_scores(run, args)
    if old is not None and "RT MSE" not in values and all(old["scores"].get(k) == values.get(k) for k in ("iters", "s/iter")):
        values = {**values, **{k: old["scores"][k] for k in ROUND_TRIP_COLUMNS if k in old["scores"]}}
    record = {"method": run.name, "style": run.style, "shots": run.shots, "seed": run.seed, "schedule": schedule_tag(args),
              "n_eval": args.n_eval, "commit": commit, "trained": trained, "written": time.strftime("%Y-%m-%d"), "scores": values}
    os.makedirs(args.scores, exist_ok=True)
    with open(scores_path(run, args), "w") as f:
        json.dump(record, f, indent=1)
    return values


def comparison_row(images):
    """Ten images [10, 3, H, W] in [-1, 1] -> one row of the comparison figure [h, w, 3] uint8 RGB."""
    return runtime.image_grid(images, len(images)).permute(1, 2, 0).numpy()


def backfill(path, args):
    """Score files for the runs of a one-seed results table written before score files existed (the
    committed results.md / results-paper.md): schedule, seed and latents from its first line, one file per
    run row; the rows "target renders" and "source (no adaptation)" are left out (they need no run: every
    table computes them). The commit and the training date are unknown and say so. Returns how many files it wrote."""
    with open(path) as f:
        text = f.read()
    head = re.match(r"Testbed, schedule (demo|paper|(\d+) iterations), seeds \[(\d+)\], (\d+) latents", text)
    if head is None:
        raise common.UserError(f"{path}: not a one-seed testbed table (its first line names the schedule, one seed and the latents)")
    schedule, iters, seed, n_eval = head.groups()
    table_args = argparse.Namespace(**{**vars(args), "schedule": schedule, "iter": int(iters) if iters else None, "n_eval": int(n_eval)})
    commit = f"unknown (backfilled from {os.path.relpath(os.path.abspath(path), ROOT)} at {git_commit(os.path.abspath(path))})"
    written = 0
    for style, shots, table in re.findall(r"^### (\w+), (\d+) shots?\n\n(.*?)(?:\n\n|\Z)", text, re.M | re.S):
        lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
        for name, *cells in lines[2:]:  # below the header and its rule
            if name not in METHODS:
                continue
            try:
                values = {column: float(v) for column, v in zip(lines[0][1:], cells) if v}
            except ValueError:  # a run's error line
                continue
            values["iters"] = int(values["iters"])
            run = Run(name, style, int(shots), int(seed))
            if run.shots == len(toyfaces.TARGET_SEEDS):  # the 10-shot tables leave out IC-div10, their IC-div
                values.setdefault("IC-div10", values["IC-div"])
            write_scores(run, table_args, values, commit, "unknown")
            written += 1
    return written


# The papers' claims the testbed tests: (paper, claim, the paper's own evidence, the test: a function of
# value(shots, name, column) -> (verdict, numbers); value gives (mean, std, seeds) over seeds or None when not
# run, verdict is one of VERDICTS). The evidence column names the paper's table or figure and the direction of
# its result; the papers' numbers are not restated (no copy of the PDFs on the development machines). The
# verdicts use only the testbed's numbers.
VERDICT_RULE = (
    "A comparison \"A better than B on a metric\" takes d = mean_A - mean_B over the seeds each ran, signed so that "
    "d > 0 means A is better, and its standard error se = sqrt(s_A^2/n_A + s_B^2/n_B) (Welch; s the seeds' sample "
    "std, n their number). With at least 2 seeds on each side it **holds** when d > 2 se, **does not hold** when "
    "d < -2 se, and is **within noise** otherwise. With 1 seed on a side there is no noise estimate: the sign of d "
    "decides (a tie does not hold), labelled \"(1 seed, noise unknown)\". A claim of several comparisons holds only "
    "if each holds, does not hold if any does not hold, is within noise if none fails and one is within noise, and "
    "is not testable while a run it needs is missing (and none that ran failed).")
# worst first: a conjunction takes its worst part; a failure with a noise estimate outranks one without
VERDICTS = ("does not hold", "does not hold (1 seed, noise unknown)", None, "within noise", "holds (1 seed, noise unknown)", "holds")


def verdict(a, b, lower_is_better):
    """Whether A beats B, a and b (mean, std, seeds) as `stats` gives them, by VERDICT_RULE: with 2 or more seeds
    on each side d = mean_A - mean_B (positive: A better) against se = sqrt(s_A^2/n_A + s_B^2/n_B), "holds" beyond
    +2 se, "does not hold" beyond -2 se, "within noise" between; with 1 seed on a side the sign of d, labelled."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a, b
    d = mean_b - mean_a if lower_is_better else mean_a - mean_b
    if min(n_a, n_b) < 2:
        return ("holds" if d > 0 else "does not hold") + " (1 seed, noise unknown)"
    se = math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)
    return "holds" if d > 2 * se else "does not hold" if d < -2 * se else "within noise"


def combine(verdicts):
    """A conjunction's verdict (VERDICT_RULE): its worst part in the order of VERDICTS."""
    return min(verdicts, key=VERDICTS.index)


def _compare(value, shots, column, name, others, lower_is_better):
    """Whether `name` beats every run of `others` on a column; the numbers used."""
    mine = value(shots, name, column)
    theirs = {o: value(shots, o, column) for o in others}
    missing = [o for o, v in {name: mine, **theirs}.items() if v is None]
    if missing:
        return None, "not run: " + ", ".join(f"{m} ({shots} shots)" for m in missing)
    verdicts = {o: verdict(mine, v, lower_is_better) for o, v in theirs.items()}
    beaten = [o for o, v in verdicts.items() if v.startswith("does not hold")]
    noisy = [o for o, v in verdicts.items() if v == "within noise"]
    numbers = f"{column} {name} {cell(mine)}; " + ", ".join(f"{o} {cell(v)}" for o, v in theirs.items())
    notes = ([f"not better than {', '.join(beaten)}"] if beaten else []) + ([f"within noise of {', '.join(noisy)}"] if noisy else [])
    return combine(verdicts.values()), numbers + (f" ({'; '.join(notes)})" if notes else "")


def _all(*parts):
    """A conjunction (VERDICT_RULE): fails as soon as a tested part fails, untestable while a part is missing and none failed."""
    return combine([v for v, _ in parts]), "; ".join(dict.fromkeys(n for _, n in parts))  # a missing run named once


def _grows_with_shots(value, name, shots):
    ys = [value(k, name, "IC-div10") for k in shots]  # around the same ten targets at every k
    if None in ys:
        return None, f"not run: {name} at " + ", ".join(f"{k}" for k, y in zip(shots, ys) if y is None) + " shots"
    return combine([verdict(b, a, False) for a, b in zip(ys, ys[1:])]), f"{name} IC-div10 " + " -> ".join(cell(y) for y in ys)


BASELINES_CDC = ("tgan", "ada", "freezed", "ewc")
CLAIMS = [
    ("CDC", "lower FD than TGAN, TGAN+ADA, FreezeD and EWC at 10 shots",
     "Tables 1-2, FID at 10 shots (Babies, Sunglasses, Sketches): CDC below every transfer baseline",
     lambda value: _compare(value, 10, "FD", "cdc", BASELINES_CDC, True)),
    ("CDC", "higher diversity than TGAN, TGAN+ADA, FreezeD and EWC at 10 shots",
     "Tables 1-2, intra-cluster LPIPS at 10 shots: CDC above every transfer baseline",
     lambda value: _compare(value, 10, "IC-div", "cdc", BASELINES_CDC, False)),
    ("CDC", "diversity grows with 1 -> 5 -> 10 shots while FreezeD and EWC stay below it",
     "Fig. 9 / 13 (samples at 1, 5, 10 shots; qualitative)",
     lambda value: _all(_grows_with_shots(value, "cdc", (1, 5, 10)),
                        *[_compare(value, k, "IC-div10", "cdc", ("freezed", "ewc"), False) for k in (1, 5)])),
    ("CDC", "each component adds diversity: the full method above image-level D only, patch-level D only and no L_dist",
     "Fig. 5 (ablation samples; qualitative)",
     lambda value: _compare(value, 10, "IC-div", "cdc", ("cdc_image", "cdc_patch", "cdc_nodist"), False)),
    ("C3", "lower FD than CDC at 10 shots", "its FID table: C3 below CDC",
     lambda value: _compare(value, 10, "FD", "c3", ("cdc",), True)),
    ("RSSA", "better structure preservation than CDC, at some cost of diversity",
     "its SCS and intra-LPIPS tables: structural consistency above CDC's, diversity at or below CDC's",
     lambda value: _all(_compare(value, 10, "geom err", "rssa", ("cdc",), True),
                        _compare(value, 10, "IC-div", "cdc", ("rssa",), False))),
    ("Progressive ASC", "better identity (geom err) than CDC and RSSA at 5 shots",
     "Table 1 (5 shots): identity preserved better than by CDC / IDC and RSSA",
     lambda value: _compare(value, 5, "geom err", "progressive_asc", ("cdc", "rssa"), True)),
    ("Progressive ASC", "better round-trip reconstruction than CDC and RSSA (5 shots each way)",
     "Table 2: LPIPS / MSE of source -> target -> source lowest for the progressive method",
     lambda value: _all(_compare(value, 5, "RT MSE", "progressive_asc", ("cdc", "rssa"), True),
                        _compare(value, 5, "RT cos", "progressive_asc", ("cdc", "rssa"), False))),
    ("DiFa", "one-shot adaptation keeps more diversity than NADA and than fine-tuning from one image",
     "its diversity (intra-LPIPS) comparison: DiFa above NADA and the fine-tuned baselines at one shot",
     lambda value: _compare(value, 1, "IC-div", "difa", ("nada", "tgan"), False)),
]


def claims_markdown(results, args):
    """The claims table: one row per claim, a verdict per style (VERDICT_RULE) with the testbed's numbers."""
    lines = ["| paper | claim | the paper's evidence | " + " | ".join(f"testbed, {s}" for s in args.styles) + " |",
             "|---|---|---|" + "---|" * len(args.styles)]
    for paper, claim, evidence, test in CLAIMS:
        cells = []
        for style in args.styles:
            def value(shots, name, column, style=style):
                if name in ONE_SHOT + ZERO_SHOT:  # the same run at every --shots
                    shots = next((k for (s, k, n) in results if s == style and n == name), shots)
                numbers = [v[column] for v in results.get((style, shots, name), []) if column in v]
                return stats(numbers) if numbers else None
            found, numbers = test(value)
            said, _, label = (found or "").partition(" (")  # the verdict in bold, its "(1 seed, ...)" label after it
            cells.append((f"**{said}**" + (f" ({label}" if label else "") if found else "not testable here yet") + f": {numbers}")
        lines.append(f"| {paper} | {claim} | {evidence} | " + " | ".join(cells) + " |")
    schedule = f"{args.iter} iterations" if args.iter is not None else f"the {args.schedule} schedule"
    return (f"# The papers' claims on the demo testbed\n\nToy-network scores (demo/testbed.py) at {schedule}, seeds "
            f"{' '.join(map(str, args.seeds))}, {args.n_eval} latents. A number is the mean over the seeds that ran, "
            f"\"mean ± std (n)\" with n > 1 seeds.\n\n{VERDICT_RULE}\n\n" + "\n".join(lines) + "\n")


@torch.no_grad()
def draw(g, z, batch=100):
    """g_ema samples [N, 3, H, W] for latents z with the generator's fixed noise buffers."""
    return torch.cat([g([z[i:i + batch]], randomize_noise=False)[0].clamp(-1, 1).cpu() for i in range(0, len(z), batch)])


def reference(net, source, style, n_eval):
    """What every run is scored against: latents z [N, D] (seed 2024) on the source's device, toy-network
    embeddings of n_eval renders of `style` (unseen seeds) and of the ten training targets, the source's images
    of z [N, 3, H, W] and their geometry [N, G]."""
    z = torch.randn(n_eval, source.style_dim, generator=torch.Generator().manual_seed(2024))  # [N, D]
    z = z.to(next(source.parameters()).device)
    seeds = range(toyfaces.EVAL_SEED_START, toyfaces.EVAL_SEED_START + n_eval)
    target_feats, _, _ = toy_outputs(net, toyfaces.render_batch(seeds, style, source.size))
    train_images = torch.stack([torch.from_numpy(toyfaces.render_seed(s, style, source.size)) for s in toyfaces.TARGET_SEEDS])
    train_feats, _, _ = toy_outputs(net, train_images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    source_images = draw(source, z)
    _, _, source_geometry = toy_outputs(net, source_images)
    return z, target_feats, train_feats, source_images, source_geometry


def score(net, images, source_geometry, target_feats, train_feats, style_index, ten_feats=None):
    """The columns of one row. IC-div clusters around the run's own k training images; IC-div10 around the
    style's ten targets whatever k (`ten_feats`), so that it compares runs across --shots: with fewer, larger
    clusters IC-div measures distances across the whole sample and grows as k shrinks even for the same images."""
    feats, probs, geometry = toy_outputs(net, images)
    values = {
        "FD": frechet_distance(feats, target_feats),
        "IC-div": intra_cluster_diversity(feats, train_feats),
        "geom err": geometry_error(source_geometry, geometry) if source_geometry is not None else float("nan"),
        "p(target)": float(probs[:, style_index].mean()),
    }
    if ten_feats is not None:
        values["IC-div10"] = intra_cluster_diversity(feats, ten_feats)
    return values


def round_trip_score(net, source_images, round_trip_images):
    """The round trip's reconstruction of the source: pixel MSE, embedding cosine similarity, geometry error."""
    source_feats, _, source_geometry = toy_outputs(net, source_images)
    feats, _, geometry = toy_outputs(net, round_trip_images)
    return {
        "RT MSE": float((source_images - round_trip_images).pow(2).mean()),
        "RT cos": float(torch.nn.functional.cosine_similarity(source_feats, feats, dim=1).mean()),
        "RT geom": geometry_error(source_geometry, geometry),
    }


def figure_label(name, shots, args):
    """A method's row label in the comparison figure: its name, with its shots where it has not the most."""
    return name if shots == max(args.shots) or name in ONE_SHOT + ZERO_SHOT else f"{name}, {shots} shot{'s' if shots > 1 else ''}"


def labelled_rows(rows, scale=3):
    """One PNG: a text label, then the row (comparison_row), upscaled (nearest) for viewing."""
    strips = []
    width = max(190, max(cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)[0][0] for label, _ in rows) + 16)
    for label, row in rows:
        grid = cv2.resize(row, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)  # [h, w, 3] uint8
        margin = np.full((grid.shape[0], width, 3), 255, np.uint8)
        cv2.putText(margin, label, (8, grid.shape[0] // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        strips.append(np.concatenate([margin, grid], 1))
    return np.concatenate(strips, 0)


def last_sample_grid(run, scale=2):
    """The run's last source-vs-adapted sample grid (BGR), upscaled (nearest) for viewing."""
    names = sorted(n for n in os.listdir(run.samples) if n[:-4].isdigit())
    grid = cv2.imread(os.path.join(run.samples, names[-1]))
    return cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def stats(numbers):
    """(mean, sample std, n) of one column over seeds (std 0 for one seed)."""
    return float(np.mean(numbers)), float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0, len(numbers)


def mean_std(values):
    """Cells of several seeds: {column: (mean, std, n)} over the seeds' score dicts (numbers only)."""
    merged = {}
    for column in dict.fromkeys(k for v in values for k in v):  # a round trip may have run for some seeds only
        numbers = [v[column] for v in values if isinstance(v.get(column), (int, float))]
        if numbers:
            merged[column] = stats(numbers)
    return merged


def cell(value):
    """A table cell: "mean ± std (n)" over n > 1 seeds, the plain number for one."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    mean, std, n = value
    if mean != mean:
        return ""
    text = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.3g}"  # iteration counts in full
    return f"{text} ± {std:.2g} ({n})" if n > 1 else text


def markdown(rows, columns):
    head = "| run | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = ""
    for name, values in rows:
        cells = []
        for column in columns:
            value = values.get(column)
            if column == "iters" and isinstance(value, tuple) and value[1] == 0:  # every seed ran the same count: once
                value = (value[0], 0.0, 1)
            cells.append(cell(value))
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def line_plot(series, xs, title, y_label, size=(560, 360)):
    """A small line chart (BGR uint8) drawn with OpenCV: one coloured line per series {label: [y per x]}."""
    width, height = size
    left, right, top, bottom = 60, 150, 30, 40
    image = np.full((height, width, 3), 255, np.uint8)
    ys = [y for values in series.values() for y in values if y is not None]
    low, high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    low, high = low - 0.05 * (high - low + 1e-6), high + 0.05 * (high - low + 1e-6)

    def point(x, y):
        px = left + (xs.index(x) / max(len(xs) - 1, 1)) * (width - left - right)
        return int(px), int(top + (high - y) / (high - low) * (height - top - bottom))

    cv2.rectangle(image, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for x in xs:
        cv2.putText(image, str(x), (point(x, low)[0] - 5, height - bottom + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for y in np.linspace(low, high, 5):
        cv2.putText(image, f"{y:.2f}", (8, point(xs[0], y)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, title, (left + 60, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, y_label, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140), (194, 119, 227)]
    for k, (label, values) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        points = [point(x, y) for x, y in zip(xs, values) if y is not None]
        for a, b in zip(points, points[1:]):
            cv2.line(image, a, b, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(image, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(image, label, (width - right + 10, top + 16 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return image


def main(argv=None):
    args = parse_args(argv)
    if args.backfill_from:
        print(f"testbed: {backfill(args.backfill_from, args)} score files from {args.backfill_from} in {args.scores}")
        return
    device = runtime.resolve_device(args.device)
    source = load_checkpoint(runtime.DEMO_SOURCE, require=("g_ema",), device=device)[0]["g_ema"]
    args.size = source.size
    grid = [Run(name, style, shots, seed) for seed in args.seeds for style in args.styles for shots in args.shots for name in args.methods]
    grid = list({r.folder(args): r for r in grid}.values())  # one-shot and zero-shot runs are the same at every --shots
    backs = [Run(r.name, r.style, ROUND_TRIP_SHOTS, r.seed, back=True) for r in grid
             if args.round_trip and r.name in ROUND_TRIP and r.shots == ROUND_TRIP_SHOTS]
    forwards = {r.folder(args): r for r in grid}
    for r in backs:  # a round trip's first leg is a 5-shot run, trained even when 5 is not among --shots
        forwards.setdefault(Run(r.name, r.style, ROUND_TRIP_SHOTS, r.seed).folder(args), Run(r.name, r.style, ROUND_TRIP_SHOTS, r.seed))

    errors = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {folder: pool.submit(train, run, args) for folder, run in forwards.items()}

        def train_back(run):
            first = Run(run.name, run.style, ROUND_TRIP_SHOTS, run.seed)
            if futures[first.folder(args)].result() is not None:
                return "its first leg did not run"
            return train(run, args, source=runtime.RunDir(first.folder(args)).latest_checkpoint())

        futures.update({r.folder(args): pool.submit(train_back, r) for r in backs})
        for folder, future in futures.items():
            errors[folder] = future.result()

    net = load_toynet(device=device)
    results = {}  # (style, shots, name) -> [score dict per seed]
    os.makedirs(args.out, exist_ok=True)
    tag = "-paper" if args.schedule == "paper" and args.iter is None else ""
    png = [cv2.IMWRITE_PNG_COMPRESSION, 9]
    text = (f"Testbed, schedule {args.schedule if args.iter is None else f'{args.iter} iterations'}, seeds {args.seeds}, {args.n_eval} latents. "
            "A cell is the mean over the seeds that ran, \"mean ± std (n)\" with n > 1 seeds (sample std).\n")
    scored_at = None  # HEAD, read once if a run folder does not record its commit
    for style in args.styles:
        style_index = toyfaces.STYLES.index(style)
        z, target_feats, train_feats, source_images, source_geometry = reference(net, source, style, args.n_eval)
        reference_seeds = range(toyfaces.EVAL_SEED_START + args.n_eval, toyfaces.EVAL_SEED_START + 2 * args.n_eval)
        frame = [("target renders", score(net, toyfaces.render_batch(reference_seeds, style, source.size), None, target_feats, train_feats, style_index, train_feats)),
                 ("source (no adaptation)", score(net, source_images, source_geometry, target_feats, train_feats, style_index, train_feats))]
        figure, pictured, unpictured = [("source", comparison_row(source_images[:10]))], set(), set()  # each method once, from its run with the most shots
        grids_missing = set()  # sample grids need the run folder
        for shots in sorted(set(args.shots) | ({ROUND_TRIP_SHOTS} if backs else set()), reverse=True):
            rows = [(name, {k: (v, 0.0, 1) for k, v in values.items()}) for name, values in frame]
            not_run = []
            for name in args.methods:
                per_seed, error = [], None
                for seed in args.seeds:
                    run = Run(name, style, shots, seed)
                    if run.folder(args) not in forwards or (name in ONE_SHOT + ZERO_SHOT and shots != min(args.shots)):
                        continue  # one-shot and zero-shot runs: one row, in the table of the fewest --shots
                    error = errors.get(run.folder(args)) or (None if finished(run, args) else "not run yet")
                    record = read_scores(run, args) if error == "not run yet" else None
                    if record is not None:  # no run folder: its score file and its picture
                        per_seed.append(record["scores"])
                        if seed == args.seeds[0] and name not in pictured:
                            grids_missing.add(name)
                            row = read_pictures(run, args)
                            if row is None:
                                unpictured.add(name)
                            else:
                                pictured.add(name)
                                figure.append((figure_label(name, shots, args), row))
                        continue
                    if error is not None:
                        continue
                    folder = runtime.RunDir(run.folder(args))
                    # as each method samples: RSSA behind its P, MineGAN behind its miner, BSA with its scale / shift
                    adapted_images = draw(load_generator(folder.latest_checkpoint(), device), z)
                    run_feats = train_feats if run.shots == len(toyfaces.TARGET_SEEDS) or run.shots == 0 else \
                        toy_outputs(net, torch.stack([common.load_image(p, source.size) for p in paths(run)]).float() / 127.5 - 1)[0]
                    seconds, iters, *commit = finished(run, args)
                    values = score(net, adapted_images, source_geometry, target_feats, run_feats, style_index, ten_feats=train_feats)
                    values.update({"iters": iters, "s/iter": seconds / max(iters, 1)})
                    back = Run(name, style, ROUND_TRIP_SHOTS, seed, back=True)
                    if shots == ROUND_TRIP_SHOTS and any(b.folder(args) == back.folder(args) for b in backs) and finished(back, args):
                        round_trip = load_generator(runtime.RunDir(back.folder(args)).latest_checkpoint(), device)
                        values.update(round_trip_score(net, source_images, draw(round_trip, z)))
                    if not commit:
                        scored_at = scored_at or git_commit()
                    trained = time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(os.path.join(folder.root, "testbed.json"))))
                    per_seed.append(write_scores(run, args, values, commit[0] if commit else f"unknown; scored at {scored_at}", trained))
                    row = comparison_row(adapted_images[:10])
                    cv2.imwrite(pictures_path(run, args), row[..., ::-1], png)
                    if seed == args.seeds[0] and name not in pictured:
                        pictured.add(name)
                        figure.append((figure_label(name, shots, args), row))
                        if style == args.styles[0]:
                            cv2.imwrite(os.path.join(args.out, f"samples_{name}{tag}.png"), last_sample_grid(folder), png)
                if per_seed:
                    results[(style, shots, name)] = per_seed
                    rows.append((name, mean_std(per_seed)))
                elif error == "not run yet":
                    not_run.append(name)
                elif error is not None:
                    rows.append((name, {"FD": f"{error}"}))
            if len(rows) == 2:
                continue
            columns = ["FD", "IC-div"] + (["IC-div10"] if shots != len(toyfaces.TARGET_SEEDS) else []) + ["geom err", "p(target)", "iters", "s/iter"]
            if any("RT MSE" in values for _, values in rows):
                columns += ["RT MSE", "RT cos", "RT geom"]
            table = f"\n### {style}, {shots} shot{'s' if shots > 1 else ''}\n\n" + markdown(rows, columns)
            table += f"\nNot run yet: {', '.join(not_run)}.\n" if not_run else ""
            text += table
            print(table, flush=True)
        name = "comparison" + ("" if style == "sketch" else f"_{style}") + tag + ".png"
        if grids_missing:
            print(f"testbed: the sample grids of {', '.join(sorted(grids_missing))} not written: no run folder, "
                  f"their numbers come from {args.scores}", file=sys.stderr)
        if unpictured:  # a figure without some rows would pass for the whole comparison
            print(f"testbed: {name} not written: no run folder and no picture in {args.scores} for "
                  f"{', '.join(sorted(unpictured))} (seed {args.seeds[0]})", file=sys.stderr)
        else:
            cv2.imwrite(os.path.join(args.out, name), labelled_rows(figure)[..., ::-1], png)
        if len(args.shots) > 1:
            xs = sorted(args.shots)
            series = {}
            for method in [m for m in args.methods if m not in ONE_SHOT + ZERO_SHOT]:  # those train on one image or none at any --shots
                ys = [float(np.mean([v["IC-div10"] for v in results[(style, k, method)]])) if (style, k, method) in results else None for k in xs]
                if sum(y is not None for y in ys) > 1:
                    series[method] = ys
            plot = line_plot(series, xs, f"IC-div10 vs shots ({style})", "IC-div10")
            cv2.imwrite(os.path.join(args.out, "icdiv_vs_shots" + ("" if style == "sketch" else f"_{style}") + tag + ".png"), plot, png)
    with open(os.path.join(args.out, f"results{tag}.md"), "w") as f:
        f.write(text)
    claims_name = "claims.md" if tag else "claims-demo.md"
    with open(os.path.join(args.out, claims_name), "w") as f:
        f.write(claims_markdown(results, args))


if __name__ == "__main__":
    runtime.run_main(main)
