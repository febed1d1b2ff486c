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
