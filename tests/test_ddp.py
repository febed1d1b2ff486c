"""torchrun with 2 gloo processes on the CPU against one process: training (cdc.py, c3.py), Ctrl-C and resume, the
gathered distance-consistency loss, evaluate.py fid / iclpips.

One torchrun launch runs every 2-process job (tests/ddp_runs.py) while this process computes the single-process
references. The training comparisons run in float64: in float32 the two runs differ by rounding (a batch of 2 per
process convolves differently from a batch of 4), and Adam turns the rounding of near-zero gradients into
lr-sized steps (after 4 iterations the float32 weights differ by up to 1e-4 of their change from the source). In
float64 that rounding is 1e-13, so a tight tolerance separates it from any real difference (a wrong gradient
scale, a per-process statistic).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import c3
import cdc
import common
import evaluate
from conftest import ROOT
from ddp_runs import C3, CDC, DC_LAYERS, FID, ICLPIPS, TRAIN, dc_loss_features, squeezenet_lpips
from stylegan2 import Discriminator, Generator

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.several_processes]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_eval_inputs(folder):
    """A 32-px generator whose noise matters (noise weights 0.3: the per-chunk noise streams are compared too), 4
    real and 3 training images."""
    folder.mkdir()
    torch.manual_seed(0)
    g = Generator(32, style_dim=16, n_mlp=2, channel_cap=16)
    for name, parameter in g.named_parameters():
        if name.endswith("noise.weight"):
            parameter.data.fill_(0.3)
    torch.save({"g": g.state_dict(), "g_ema": g.state_dict(), "d": Discriminator(32, channel_cap=16).state_dict()}, folder / "model.pt")
    rng = np.random.default_rng(0)
    for name, n, size in (("real", 4, 32), ("train", 3, 40)):
        (folder / name).mkdir()
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name / f"{k}.png")


def single_process_references(root, source, target):
    """The single-process side of every job of ddp_runs.py, in this process (float64 for the training ones)."""
    single = {}
    eval_dir = root / "eval"
    default_dtype = torch.get_default_dtype()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_lpips", squeezenet_lpips(common.load_lpips))
        single["fid"] = evaluate.main([*FID, "--ckpt", str(eval_dir / "model.pt"), "--real", str(eval_dir / "real"),
                                       "--cache-dir", str(root / "fid-cache-single")])
        single["iclpips"] = list(evaluate.main([*ICLPIPS, "--ckpt", str(eval_dir / "model.pt"), "--train", str(eval_dir / "train")]))
        patch.setattr(torch.Tensor, "float", torch.Tensor.double)  # float64, as ddp_runs.as_float64
        torch.set_default_dtype(torch.float64)
        try:
            tgt = [f.requires_grad_(True) for f in dc_loss_features(4)]
            loss = cdc.distance_consistency_loss(dc_loss_features(3), tgt, torch.tensor(DC_LAYERS))
            loss.backward()
            single["dc_loss"], single["dc_grads"] = loss.item(), [f.grad for f in tgt]
            base = ["--source", source, "--target", target, *TRAIN]
            single["cdc"] = cdc.main([*base, *CDC, "--out", str(root / "single-cdc")])
            single["c3"] = c3.main([*base, *C3, "--out", str(root / "single-c3")])
        finally:
            torch.set_default_dtype(default_dtype)
    return single


@pytest.fixture(scope="module")
def runs(setup):
    """(root, single-process results, rank 0's stdout and results.json of the 2-process jobs)."""
    root, source, target = setup
    write_eval_inputs(root / "eval")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "--", os.path.join(ROOT, "tests", "ddp_runs.py"), str(root), source, target],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        single = single_process_references(root, source, target)
    except BaseException:
        launch.terminate()  # torchrun passes it on to its processes
        launch.communicate(timeout=60)
        raise
    stdout, stderr = launch.communicate(timeout=600)
    assert launch.returncode == 0, stderr[-3000:]
    return root, single, stdout, json.loads((root / "results.json").read_text())


def weights(path):
    return torch.load(path, weights_only=True)


def log_values(path):
    rows = [line.split(",") for line in open(path).read().split()]
    return rows[0], np.array([[float(v) for v in row] for row in rows[1:]])


@pytest.mark.parametrize("method", ["cdc", "c3"])
def test_two_processes_train_the_single_process_weights_and_write_once(runs, method):
    root, single, _, _ = runs
    one = weights(single[method])
    two = weights(root / method / "checkpoints" / "000004.pt")
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in one[key].items():
            assert torch.allclose(two[key][name], tensor, rtol=1e-6, atol=1e-9), (key, name)
    assert torch.allclose(two["mean_path_length"], one["mean_path_length"], rtol=1e-6)
    # log.csv: one header and one row per iteration (written by rank 0 alone), the losses averaged over the processes
    columns_one, values_one = log_values(root / f"single-{method}" / "log.csv")
    columns_two, values_two = log_values(root / method / "log.csv")
    assert columns_two == columns_one and values_two.shape == (4, len(columns_one))
    assert np.allclose(values_two, values_one, rtol=1e-5, atol=1e-9)
    assert sorted(os.listdir(root / method / "samples")) == ["000000.png", "000002.png", "000004.png"] + (
        ["anchors_000000.png", "anchors_000002.png", "anchors_000004.png"] if method == "cdc" else [])
    # every checkpoint and sample grid came from rank 0; rank 1 wrote nothing
    written = open(root / "writes_0.txt").read().split()
    assert str(root / method / "checkpoints" / "000004.pt") in written and str(root / method / "samples" / "000002.png") in written
    assert not (root / "writes_1.txt").exists()


def test_ctrl_c_in_one_process_stops_all_and_the_run_resumes_under_torchrun(runs):
    root, _, stdout, results = runs
    assert results["interrupted_exit"] == 130
    # rank 1 saw the Ctrl-C during iteration 0; both stopped after iteration 1 (2 done), and rank 0 printed the command
    assert "stopped by Ctrl-C, 2 iterations done of " in stdout and "(saved in 000002.pt); resume with: torchrun --nproc_per_node 2 " in stdout
    straight = weights(root / "cdc" / "checkpoints" / "000004.pt")
    resumed = weights(root / "interrupted" / "checkpoints" / "000004.pt")
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    assert open(root / "cdc" / "log.csv").read() == open(root / "interrupted" / "log.csv").read()


def test_gathered_distance_consistency_loss_is_the_single_process_loss(runs):
    _, single, _, results = runs
    assert results["dc_loss"] == pytest.approx(single["dc_loss"], rel=1e-12)
    # each process back-propagates the same loss into its rows: summed over the 2 processes by the gather, so the
    # rows get twice the single-process gradient, and the average over processes before a step halves it back
    grads = torch.load(runs[0] / "dc_grads.pt", weights_only=True)
    for two, one in zip(grads, single["dc_grads"]):
        assert torch.allclose(two / 2, one, rtol=1e-10, atol=1e-14)


def test_evaluate_fid_and_iclpips_with_two_processes_equal_one(runs):
    _, single, _, results = runs
    assert results["fid"] == single["fid"]
    np.testing.assert_equal(results["iclpips"], single["iclpips"])  # mean, std (NaN equals NaN), cluster sizes
