import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster than two when the CPU is shared (a module's tests use it
    with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tiny_source(path, seed=0):
    """A tiny source checkpoint in rosinality's layout (g, g_ema, d, optimisers, argparse args): 32 px,
    style dim 16, 2 mapping layers, every layer capped at 16 channels."""
    import argparse

    from stylegan2 import Discriminator, Generator

    torch.manual_seed(seed)
    g = Generator(32, style_dim=16, n_mlp=2, channel_cap=16)
    g_ema = Generator(32, style_dim=16, n_mlp=2, channel_cap=16)
    d = Discriminator(32, channel_cap=16)
    torch.save(
        {
            "g": g.state_dict(), "g_ema": g_ema.state_dict(), "d": d.state_dict(),
            "g_optim": torch.optim.Adam(g.parameters(), lr=0.0016, betas=(0.0, 0.99)).state_dict(),
            "d_optim": torch.optim.Adam(d.parameters(), lr=0.0016, betas=(0.0, 0.99)).state_dict(),
            "args": argparse.Namespace(size=32, batch=16), "ada_aug_p": 0.0,
        },
        path,
    )
    return str(path)


def write_random_images(folder, n=5, size=(40, 48), seed=0):
    """n random RGB PNGs of size (h, w) in folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    """(root, source checkpoint, target folder of 5 random 40x48 images) shared by a test module."""
    root = tmp_path_factory.mktemp(request.module.__name__.split(".")[-1])
    source = write_tiny_source(root / "source.pt")
    target = write_random_images(root / "target")
    return root, source, target


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo-claim test (tests/test_demo.py) trains two 400-iteration demo runs, about two minutes on one thread
# each. They start in background processes as soon as the tests are collected, and the test itself runs last,
# so the rest of the suite runs meanwhile (on one thread) instead of after them.
DEMO_CLAIM_TEST = "test_short_demo_adaptation_reaches_the_target_and_cdc_keeps_more_diversity"
DEMO_CLAIM_ITERS = 400
DEMO_CLAIM_RUNS = {"cdc": [], "finetune": ["--no-dist", "--adv", "image"]}  # TGAN fine-tuning is cdc.py with these flags


def pytest_collection_modifyitems(session, config, items):
    import subprocess
    import tempfile

    claim = [item for item in items if item.name == DEMO_CLAIM_TEST]
    if not claim:
        return
    items.remove(claim[0])
    items.append(claim[0])
    folder = tempfile.mkdtemp(prefix="demo-claim-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = {}
    for name, flags in DEMO_CLAIM_RUNS.items():
        with open(os.path.join(folder, f"{name}.log"), "w") as log:  # a file, not a pipe: the progress bar would fill a pipe
            processes[name] = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "cdc.py"), *flags, "--iter", str(DEMO_CLAIM_ITERS), "--save-every", "100",
                 "--sample-every", "100000", "--device", "cpu", "--out", os.path.join(folder, name)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    config.demo_claim_runs = (folder, processes)
    torch.set_num_threads(1)  # the two runs hold a core each: more threads here would only spin against them


def pytest_unconfigure(config):
    import shutil

    folder, processes = getattr(config, "demo_claim_runs", (None, {}))
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def standard_bad_inputs(tmp_path, source, target):
    """(argv, expected message) for the bad inputs every method must refuse with one line: missing, empty and
    corrupt target folders, a missing checkpoint, a g_ema-only checkpoint."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    g_only = tmp_path / "g_ema_only.pt"
    torch.save({"g_ema": torch.load(source, weights_only=False)["g_ema"]}, g_only)
    return [
        (["--source", source, "--target", str(tmp_path / "missing")], "target not found"),
        (["--source", source, "--target", str(empty)], "no images"),
        (["--source", source, "--target", str(corrupt)], "cannot read image"),
        (["--source", str(tmp_path / "nope.pt"), "--target", target], "checkpoint not found"),
        (["--source", str(g_only), "--target", target], "fine-tunes the source discriminator"),
    ]


def assert_cli_errors(script, cases, base, every_case_as_a_process=False):
    """Each case run as `python <script> argv base` exits 2 with one stderr line `error: ...message...`.

    The first case (every case with every_case_as_a_process) runs as a process: what a user sees, through the
    script's common.run_main. The others call the script's main() in this process and expect the one-line
    UserError / CheckpointError that run_main prints (an interpreter start-up each would cost seconds on two
    cores). Processes run concurrently: each is mostly a single-threaded interpreter start-up."""
    import importlib
    import subprocess
    import sys

    from common import UserError
    from stylegan2 import CheckpointError

    as_processes = cases if every_case_as_a_process else cases[:1]
    processes = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args, *base], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for args, _ in as_processes]
    module = importlib.import_module(os.path.splitext(script)[0])
    for args, message in cases[len(as_processes):]:
        with pytest.raises((UserError, CheckpointError)) as info:
            module.main([*args, *base])
        assert message in str(info.value) and "\n" not in str(info.value), (args, str(info.value))
    for (args, message), process in zip(as_processes, processes):
        stderr = process.communicate()[1].strip()
        assert process.returncode == 2, (args, stderr)
        assert stderr.startswith("error: ") and message in stderr and "\n" not in stderr, stderr
