import json
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
# so the rest of the suite runs meanwhile (on one thread) instead of after them. The tests marked
# several_processes (torchrun's two workers, two runs side by side) run just before it: by then the demo runs
# have finished or nearly, and their processes take the core this one-thread process leaves free.
DEMO_CLAIM_TEST = "test_short_demo_adaptation_reaches_the_target_and_cdc_keeps_more_diversity"
DEMO_CLAIM_ITERS = 400
DEMO_CLAIM_RUNS = {"cdc": [], "finetune": ["--no-dist", "--adv", "image"]}  # TGAN fine-tuning is cdc.py with these flags


def pytest_configure(config):
    config.addinivalue_line("markers", "several_processes: starts processes that run side by side (run late, see DEMO_CLAIM_TEST)")


def pytest_collection_modifyitems(session, config, items):
    import subprocess
    import tempfile

    claim = [item for item in items if item.name == DEMO_CLAIM_TEST]
    if not claim:
        return
    several = [item for item in items if item.get_closest_marker("several_processes")]
    for item in [*several, claim[0]]:
        items.remove(item)
        items.append(item)
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
    if _script_runner is not None:
        _script_runner.stdin.close()
        _script_runner.wait()


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


# A user's bad input must end in one line on stderr and exit status 2, through the script's own `__main__` block.
# Starting an interpreter for each such case costs ~3 s of CPU (importing torch) on the 2-core CPU, so the suite
# starts one interpreter, imports torch and the scripts' modules once, and forks a process from it per case: each
# case is still a process of its own that runs the script's file as __main__ (runpy) with the case's argv, working
# folder and environment, its stdout and stderr in files and its exit status the process's. Off Linux (no fork on
# Windows; forking after importing torch is unsafe on macOS) each case is a fresh interpreter instead.
SCRIPT_RUNNER = r"""
import json, os, runpy, sys, tempfile, traceback
sys.path.insert(0, sys.argv[1])
import torch
import baselines, c3, cdc, difa, evaluate, nada, progressive_asc, rssa  # noqa: E401,F401 (imported once, before the forks)
from checkpoints import load_checkpoint
from stylegan2 import Discriminator, Generator
with tempfile.TemporaryDirectory() as folder:  # reading a checkpoint imports ~800 more modules: here, not in every fork
    weights = Generator(32, style_dim=16, n_mlp=2, channel_cap=16).state_dict()
    torch.save({"g": weights, "g_ema": weights, "d": Discriminator(32, channel_cap=16).state_dict()}, os.path.join(folder, "warm.pt"))
    load_checkpoint(os.path.join(folder, "warm.pt"))
protocol = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        os.environ.clear()
        os.environ.update(case["env"])
        for fd, path in ((0, os.devnull), (1, case["stdout"]), (2, case["stderr"])):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [case["script"], *case["argv"]]
        status = 0
        try:
            runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as exit:  # sys.exit's rules: None is 0, a number is the status, anything else is printed, 1
            if exit.code is None or isinstance(exit.code, int):
                status = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    protocol.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n")
    protocol.flush()
"""
_script_runner = None


def run_script(script, argv, cwd=ROOT, env=None):
    """(exit status, stdout, stderr) of `python <script> argv` run in cwd with env (default: this process's)."""
    import subprocess
    import tempfile

    global _script_runner
    script, env = os.path.join(ROOT, script), dict(os.environ if env is None else env)
    if not sys.platform.startswith("linux"):
        result = subprocess.run([sys.executable, script, *argv], cwd=cwd, env=env, capture_output=True, text=True)
        return result.returncode, result.stdout, result.stderr
    if _script_runner is None:
        _script_runner = subprocess.Popen([sys.executable, "-c", SCRIPT_RUNNER, ROOT], cwd=ROOT, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        request = {"script": script, "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "stdout": out, "stderr": err}
        _script_runner.stdin.write(json.dumps(request) + "\n")
        _script_runner.stdin.flush()
        line = _script_runner.stdout.readline()
        assert line, "the script runner stopped"
        return int(line), open(out).read(), open(err).read()


def assert_cli_errors(script, cases, base):
    """Each case run as `python <script> argv base` exits 2 with one stderr line `error: ...message...` (what a
    user sees, through the script's runtime.run_main; each case a process of its own, see run_script)."""
    for args, message in cases:
        code, _, stderr = run_script(script, [*args, *base])
        stderr = stderr.strip()
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and message in stderr and "\n" not in stderr, (args, stderr)
