"""Held-out toy "photos" for `evaluate.py invert / translate / edit`, and the pictures of docs/evaluation.md made from them.

    python -m demo.photos                       write demo/photos/00.png .. 05.png (32 px source-style renders)
    python -m demo.photos --pictures RUN [RUN ...]
                                                also invert them under demo/source.pt and write
                                                demo/results/translate.png and demo/results/edit.png from the
                                                runs' last checkpoints (e.g. runs/cdc-demo runs/c3-demo)

The seeds are ones no network saw: demo/source.pt trained on seeds 0 .. 19999, the target sets are
toyfaces.TARGET_SEEDS (1 000 000 ..), the testbed evaluates from toyfaces.EVAL_SEED_START (2 000 000 ..) and the toy
network trains from toynet.TRAIN_SEED_START (3 000 000 ..).
"""

import argparse
import os
import shutil
import tempfile

from PIL import Image

import evaluate
from common import UserError
from runtime import RunDir, run_main
from demo import toyfaces

PHOTOS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.dirname(PHOTOS_DIR)
PHOTO_SEEDS = range(4_000_000, 4_000_006)
EDIT_PHOTO = "00.png"  # the photo of the edit strip
EDIT_STRENGTHS = ["-3", "-1.5", "0", "1.5", "3"]


def write_photos(folder=PHOTOS_DIR, size=32):
    for k, seed in enumerate(PHOTO_SEEDS):
        Image.fromarray(toyfaces.render_seed(seed, "source", size)).save(os.path.join(folder, f"{k:02d}.png"))
    print(f"wrote {len(PHOTO_SEEDS)} photos (seeds {PHOTO_SEEDS.start} ..) to {folder}")


def last_checkpoint(run):
    path = RunDir(run).latest_checkpoint()
    if path is None:
        raise UserError(f"{run} holds no checkpoint (train it first, e.g. python cdc.py --out {run})")
    return path


def make_pictures(runs, steps, random_weights):
    """Invert the photos once, then translate.png (every photo) and edit.png (pc0 of one photo) in demo/results."""
    ckpts = [last_checkpoint(run) for run in runs]
    names = [os.path.basename(os.path.normpath(run)).removesuffix("-demo") for run in runs]
    source = os.path.join(DEMO_DIR, "source.pt")
    results = os.path.join(DEMO_DIR, "results")
    flags = ["--device", "cpu"] + (["--random-weights"] if random_weights else [])
    with tempfile.TemporaryDirectory() as work:
        evaluate.main(["invert", "--source", source, "--images", PHOTOS_DIR, "--steps", str(steps), "--out", work, *flags])
        codes = os.path.join(work, "codes.pt")
        shared = ["--source", source, "--ckpt", *ckpts, "--names", *names, "--images", PHOTOS_DIR, "--codes", codes, *flags]
        evaluate.main(["translate", *shared, "--out", os.path.join(work, "translate")])
        shutil.copy(os.path.join(work, "translate", "translation.png"), os.path.join(results, "translate.png"))
        evaluate.main(["edit", *shared, "--direction", "pc0", "--strength", *EDIT_STRENGTHS, "--out", os.path.join(work, "edit")])
        strip = os.path.splitext(EDIT_PHOTO)[0] + "_edit.png"
        shutil.copy(os.path.join(work, "edit", strip), os.path.join(results, "edit.png"))
    print(f"wrote {os.path.join(results, 'translate.png')} and {os.path.join(results, 'edit.png')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="the demo's held-out photos and the translate / edit pictures")
    parser.add_argument("--pictures", nargs="+", metavar="RUN", help="run folders of demo runs (e.g. runs/cdc-demo runs/c3-demo)")
    parser.add_argument("--steps", type=int, default=500, help="inversion steps for the pictures (default 500: the RSSA demo's)")
    parser.add_argument("--random-weights", action="store_true",
                        help="invert with a randomly initialised LPIPS backbone (when the VGG weights are not available)")
    args = parser.parse_args(argv)
    write_photos()
    if args.pictures:
        make_pictures(args.pictures, args.steps, args.random_weights)


if __name__ == "__main__":
    run_main(main)
