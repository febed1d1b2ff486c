"""CPU testbed: every method, and plain fine-tuning as the baseline, on the demo, scored against ground truth.

    python -m demo.testbed                       # all methods on the sketch target; table + figure in demo/results
    python -m demo.testbed --methods cdc finetune --iter 100 --style sunglasses

Each method runs as its own script in demo mode (the shipped toy-face source, ten targets, fixed seeds),
in a subprocess, into <work-dir>/<method>. Then its final g_ema and the source g_ema draw the same latents
with the same noise, and the toy network (demo/toynet.py) scores them:

    FD        Frechet distance to 1000 renders of the full target distribution (lower: closer to the domain)
    IC-div    intra-cluster diversity around the ten training images (higher: less memorisation / collapse)
    geom err  mean change of the face's geometry (positions, size, pose, gaze, mouth) from G_s(z) to G_t(z), in
              units of its spread over faces (lower: better correspondence; 0 same geometry, 1.13 unrelated faces)
    p(target) mean probability the toy network gives the target style (higher: further into the domain)
    s/iter    wall time of the whole run (set-up such as RSSA's inversion included) per iteration, this machine

Rows "source" (no adaptation) and "target renders" (another 1000 renders: the floor of FD, the diversity of
the real distribution) frame the numbers. Writes <out>/results.md, <out>/comparison.png (rows: source,
then each method, the same ten latents in every row) and <out>/samples_<method>.png (each run's last sample
grid: source left, adapted right).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from demo import toyfaces  # noqa: E402
from demo.toynet import frechet_distance, geometry_error, intra_cluster_diversity, load_toynet, toy_outputs  # noqa: E402
from evaluate import load_generator  # noqa: E402
from stylegan2 import load_checkpoint  # noqa: E402

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
}
ONE_SHOT = ("difa", "nada")  # trained on the first training image only
# the text target of the zero-shot rows, per style: the toy CLIP's own caption of that style (demo/toyclip.py)
TEXT_TARGETS = {"sketch": "a pencil sketch of a face", "sunglasses": "a photo of a face with sunglasses"}
RESULTS_DIR = os.path.join(ROOT, "demo", "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="run every method on the demo and score it with the toy network")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which runs (default: all)")
    p.add_argument("--style", choices=toyfaces.TARGET_STYLES, default="sketch", help="target domain (default sketch)")
    p.add_argument("--iter", type=int, default=None, help="iterations of every run (default: each method's demo default)")
    p.add_argument("--seed", type=int, default=1, help="seed of every run")
    p.add_argument("--n-eval", type=int, default=1000, help="generated images and target renders per metric")
    p.add_argument("--work-dir", default=os.path.join("runs", "testbed"), help="run folders")
    p.add_argument("--out", default=RESULTS_DIR, help="results.md and comparison.png")
    p.add_argument("--extra", action="append", default=[], metavar="METHOD=ARGS",
                   help="extra arguments for one method, e.g. rssa=--lpips-random-backbone (repeatable)")
    p.add_argument("--reuse", action="store_true", help="score existing run folders instead of training again")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def run_method(name, args, out):
    """Train one method in demo mode in a subprocess; returns (seconds, iterations, error line or None)."""
    script, extra = METHODS[name]
    target = os.path.join(common.DEMO_DIR, "targets", args.style)
    command = [sys.executable, os.path.join(ROOT, script), *extra, "--out", out, "--overwrite", "--seed", str(args.seed),
               "--device", args.device]  # the testbed owns its run folders: a new testbed run replaces them
    if name.endswith("_text"):
        command += ["--target-text", TEXT_TARGETS[args.style]]
        if args.style != "sketch":
            command += ["--source", common.DEMO_SOURCE]
    elif args.style != "sketch":  # the demo's default target is the sketch set; another style needs both paths
        command += ["--source", common.DEMO_SOURCE, "--target", os.path.join(target, "00.png") if name in ONE_SHOT else target]
    if args.iter is not None:
        command += ["--iter", str(args.iter), "--save-every", str(args.iter)]
    for item in args.extra:
        method, _, more = item.partition("=")
        if method == name:
            command += more.split()
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seconds = time.time() - started
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if result.returncode != 0:
        return seconds, 0, lines[-1] if lines else f"exit {result.returncode}"
    state = common.load_training_checkpoint(common.RunDir(out).latest_checkpoint())
    return seconds, int(state["iter"]), None


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


def score(net, images, source_geometry, target_feats, train_feats, style_index):
    feats, probs, geometry = toy_outputs(net, images)
    return {
        "FD": frechet_distance(feats, target_feats),
        "IC-div": intra_cluster_diversity(feats, train_feats),
        "geom err": geometry_error(source_geometry, geometry) if source_geometry is not None else float("nan"),
        "p(target)": float(probs[:, style_index].mean()),
    }


def labelled_rows(rows, scale=3):
    """One PNG: a text label, then the row's images side by side, upscaled (nearest) for viewing."""
    strips = []
    for label, images in rows:
        grid = common.image_grid(images, len(images)).permute(1, 2, 0).numpy()  # [h, w, 3] uint8
        grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        margin = np.full((grid.shape[0], 190, 3), 255, np.uint8)
        cv2.putText(margin, label, (8, grid.shape[0] // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        strips.append(np.concatenate([margin, grid], 1))
    return np.concatenate(strips, 0)


def last_sample_grid(run, scale=2):
    """The run's last source-vs-adapted sample grid (BGR), upscaled (nearest) for viewing."""
    names = sorted(n for n in os.listdir(run.samples) if n[:-4].isdigit())
    grid = cv2.imread(os.path.join(run.samples, names[-1]))
    return cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def markdown(rows, columns):
    head = "| run | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = ""
    for name, values in rows:
        cells = []
        for column in columns:
            value = values.get(column)
            if isinstance(value, (str, int)):
                cells.append(str(value))
            else:
                cells.append("" if value is None or value != value else f"{value:.3g}")
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    net = load_toynet(device=device)
    style_index = toyfaces.STYLES.index(args.style)
    source = load_checkpoint(common.DEMO_SOURCE, require=("g_ema",), device=device)[0]["g_ema"]
    z, target_feats, train_feats, source_images, source_geometry = reference(net, source, args.style, args.n_eval)
    reference_seeds = range(toyfaces.EVAL_SEED_START + args.n_eval, toyfaces.EVAL_SEED_START + 2 * args.n_eval)
    table = [("target renders", score(net, toyfaces.render_batch(reference_seeds, args.style, source.size), None,
                                      target_feats, train_feats, style_index)),
             ("source (no adaptation)", score(net, source_images, source_geometry, target_feats, train_feats, style_index))]
    figure = [("source", source_images[:10])]
    grids = {}
    for name in args.methods:
        out = os.path.join(args.work_dir, f"{name}-{args.style}")
        timing = os.path.join(out, "testbed.json")
        if args.reuse and os.path.exists(timing):
            with open(timing) as f:
                (seconds, iters), error = json.load(f), None
        else:
            print(f"testbed: {name} ...", file=sys.stderr, flush=True)
            seconds, iters, error = run_method(name, args, out)
            if error is None:
                with open(timing, "w") as f:
                    json.dump([seconds, iters], f)
        if error is not None:
            print(f"testbed: {name} did not run: {error}", file=sys.stderr)
            table.append((name, {"FD": "did not run (see the testbed's output)"}))
            continue
        run = common.RunDir(out)
        # as each method samples: RSSA behind its P, MineGAN behind its miner, BSA with its scale / shift
        adapted = load_generator(run.latest_checkpoint(), device)
        adapted_images = draw(adapted, z)
        values = score(net, adapted_images, source_geometry, target_feats, train_feats, style_index)
        values.update({"iters": iters, "s/iter": seconds / max(iters, 1)})
        table.append((name, values))
        figure.append((name, adapted_images[:10]))
        grids[name] = last_sample_grid(run)
        print(f"testbed: {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items()), file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(table, ["FD", "IC-div", "geom err", "p(target)", "iters", "s/iter"])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    png = [cv2.IMWRITE_PNG_COMPRESSION, 9]
    cv2.imwrite(os.path.join(args.out, "comparison.png"), labelled_rows(figure)[..., ::-1], png)
    for name, grid in grids.items():
        cv2.imwrite(os.path.join(args.out, f"samples_{name}.png"), grid, png)
    print(text)


if __name__ == "__main__":
    common.run_main(main)
