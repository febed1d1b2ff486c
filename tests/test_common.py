"""common.py: data, anchors, patch head, losses, optimiser scaling, EMA, RNG state, logs, grids, checkpoints."""

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import runtime
from common import UserError
from stylegan2 import Discriminator, Generator


# ------------------------------------------------------------------------------------------------
# target images


def write(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def test_image_conversions(tmp_path):
    # RGBA: transparent pixels composite on white, opaque ones keep their colour
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)
    write(tmp_path / "a.png", rgba)
    # greyscale expands to three equal channels
    write(tmp_path / "b.png", np.full((4, 4), 77, np.uint8))
    # non-square: shorter side resized to 4, centre crop keeps the middle columns
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 200
    write(tmp_path / "c.jpg", wide)
    (tmp_path / "notes.txt").write_text("not an image")
    data = common.ImageFolder(str(tmp_path), 4)
    assert [os.path.basename(f) for f in data.files] == ["a.png", "b.png", "c.jpg"]
    assert data.images.shape == (3, 3, 4, 4) and data.images.dtype == torch.uint8
    a = data.images[0]
    assert torch.all(a[:, :, :2] == torch.tensor([255, 0, 0]).view(3, 1, 1))
    assert torch.all(a[:, :, 2:] == 255)
    assert torch.all(data.images[1] == 77)
    assert data.images[2].min() > 150  # the centre crop dropped the black sides (LANCZOS rings a little)
    floats = data.as_float()
    assert floats.min() >= -1 and floats.max() <= 1
    assert torch.allclose(floats[1], torch.full((3, 4, 4), 77 / 127.5 - 1))


def test_lanczos_resize_matches_pil(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = write(tmp_path / "x.png", array)
    ours = common.load_image(str(path), 10)
    expected = Image.fromarray(array).resize((15, 10), Image.LANCZOS)
    expected = np.asarray(expected)[:, 2:12]  # centre crop of width 15 to 10: left = round((15 - 10) / 2) = 2
    assert torch.equal(ours, torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_single_image_target(tmp_path):
    path = write(tmp_path / "ref.png", np.zeros((8, 8, 3), np.uint8))
    assert len(common.ImageFolder(str(path), 8)) == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="target not found"):
        common.ImageFolder(str(tmp_path / "nope"), 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        common.ImageFolder(str(empty), 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad / "good.png", np.zeros((8, 8, 3), np.uint8))
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupted")
    with pytest.raises(UserError, match="broken.png"):
        common.ImageFolder(str(bad), 8)
    small = tmp_path / "small"
    small.mkdir()
    write(small / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="smaller than the generator's 8 px"):
        common.ImageFolder(str(small), 8)
    assert common.ImageFolder(str(small), 8, allow_upscale=True).images.shape == (1, 3, 8, 8)


def test_batches_drop_last_and_flip(tmp_path):
    for k in range(10):
        array = np.zeros((4, 4, 3), np.uint8)
        array[:, :2] = 25 * k  # left half carries the image id, right half black
        write(tmp_path / f"{k}.png", array)
    data = common.ImageFolder(str(tmp_path), 4)
    batches = data.sampler(4, "cpu")
    seen = []
    flips = 0
    for _ in range(2):  # one epoch: 2 full batches of 4, 2 images dropped
        batch = next(batches)
        assert batch.shape == (4, 3, 4, 4)
        for image in batch:
            left, right = image[0, 0, 0].item(), image[0, 0, 3].item()
            flipped = left == -1 and right != -1
            flips += flipped
            value = right if flipped else left
            seen.append(round((value + 1) * 127.5 / 25))
    assert len(set(seen)) == 8  # no repeats inside one epoch
    few = common.ImageFolder(str(tmp_path), 4)
    few.images = few.images[:3]
    few.files = few.files[:3]
    assert next(few.sampler(4, "cpu")).shape == (4, 3, 4, 4)
    # resumable: a sampler restored from state_dict draws the same batches
    sampler = data.sampler(4, "cpu")
    next(sampler)
    state, rng = sampler.state_dict(), torch.get_rng_state()
    expected = [next(sampler) for _ in range(3)]
    restored = data.sampler(4, "cpu")
    restored.load_state_dict(state)
    torch.set_rng_state(rng)
    assert all(torch.equal(a, next(restored)) for a in expected)


# ------------------------------------------------------------------------------------------------
# latents


def test_anchor_sampling_is_vectorised_get_subspace():
    anchors = torch.randn(10, 16)
    torch.manual_seed(3)
    z = common.sample_anchor_z(anchors, 6, 0.1)
    torch.manual_seed(3)
    index = torch.randint(0, 10, (6,))
    expected = anchors[index] + 0.1 * torch.randn(6, 16)
    assert torch.equal(z, expected)
    many = common.sample_anchor_z(anchors, 20000, 0.1)
    nearest = torch.cdist(many, anchors).argmin(1)
    residual = many - anchors[nearest]
    assert abs(residual.std().item() - 0.1) < 0.003
    assert torch.bincount(nearest, minlength=10).min() > 1700  # every anchor used, uniformly
    assert [common.is_anchor_iteration(i, 4) for i in range(6)] == [True, False, False, False, True, False]
    assert common.make_anchors(10, 16, "cpu").shape == (10, 16)


def test_mixing_noise():
    random.seed(0)
    counts = [len(common.mixing_noise(3, 8, 0.9, "cpu")) for _ in range(2000)]
    assert abs(counts.count(2) / 2000 - 0.9) < 0.03
    assert all(len(common.mixing_noise(3, 8, 0.0, "cpu")) == 1 for _ in range(10))
    assert common.mixing_noise(3, 8, 1.0, "cpu")[1].shape == (3, 8)


# ------------------------------------------------------------------------------------------------
# patch head


def test_patch_map_indices_match_cdc():
    with torch.device("meta"):
        d256 = Discriminator(256)
    # convs[3].conv2, convs[4].conv1, convs[4].conv2, convs[5].conv1
    assert common.patch_map_indices(d256) == [6, 7, 8, 9]
    shapes = d256.feature_map_shapes()
    assert [shapes[k] for k in [6, 7, 8, 9]] == [(512, 32), (512, 32), (512, 16), (512, 16)]
    with torch.device("meta"):
        assert common.patch_map_indices(Discriminator(64)) == [2, 3, 4, 5]


def test_patch_head_names_and_logits():
    d = Discriminator(64, channel_cap=16)
    head = common.make_patch_head(d)
    assert sorted(head.state_dict()) == sorted(
        f"new_conv.{k}.{p}" for k in range(4) for p in ("0.weight", "1.bias")
    )
    assert head.state_dict()["new_conv.0.0.weight"].shape == (1, 16, 3, 3)
    x = torch.randn(2, 3, 64, 64)
    indices = common.patch_map_indices(d)
    logits = common.patch_logits(d, head, x, 0, indices)
    assert logits.shape == (2, 1, 32, 32)
    feature = d.feature_maps(x)[indices[2]]
    assert torch.allclose(common.patch_logits(d, head, x, 2, indices), head(feature, 2), atol=1e-6)
    assert common.patch_logits(d, head, x, 3, indices).shape == (2, 1, 16, 16)


# ------------------------------------------------------------------------------------------------
# losses and regularisers


def test_gan_losses():
    real = torch.tensor([[2.0], [-1.0]])
    fake = torch.tensor([[0.5], [-3.0]])
    softplus = lambda x: torch.log1p(torch.exp(x))
    assert torch.allclose(common.d_logistic_loss(real, fake), softplus(-real).mean() + softplus(fake).mean())
    assert torch.allclose(common.g_nonsaturating_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_r1_of_a_linear_discriminator():
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    pred = (x * a).sum((1, 2, 3))[:, None]  # D(x) = <a, x>: grad = a for every sample
    assert torch.allclose(common.d_r1_loss(pred, x), a.pow(2).sum(), atol=1e-5)


def test_path_length_of_a_linear_generator():
    latents = torch.randn(2, 3, 4, requires_grad=True)
    matrix = torch.randn(4, 3 * 2 * 2)
    img = (latents.sum(1) @ matrix).view(2, 3, 2, 2)  # every W+ row enters identically
    noise = torch.randn(2, 3, 2, 2) / 2
    penalty, new_mean, lengths = common.g_path_regularize(img, latents, torch.tensor(1.0), decay=0.01, noise=noise)
    grad_row = noise.view(2, -1) @ matrix.t()  # J^T y, the same for each of the 3 rows
    expected = grad_row.pow(2).sum(1).sqrt()
    assert torch.allclose(lengths, expected, atol=1e-5)
    mean = 1.0 + 0.01 * (expected.mean() - 1.0)
    assert torch.allclose(new_mean, mean) and not new_mean.requires_grad
    assert torch.allclose(penalty, (expected - mean).pow(2).mean(), atol=1e-6)


def test_lazy_regularisation_adam():
    p = [torch.nn.Parameter(torch.zeros(1))]
    g_optim = common.make_adam(p, 0.002, 4)
    group = g_optim.param_groups[0]
    assert math.isclose(group["lr"], 0.0016) and group["betas"][0] == 0 and math.isclose(group["betas"][1], 0.99**0.8)
    d_group = common.make_adam(p, 0.002, 16).param_groups[0]
    assert math.isclose(d_group["lr"], 0.002 * 16 / 17) and math.isclose(d_group["betas"][1], 0.99 ** (16 / 17))


def test_ema_accumulate():
    assert math.isclose(common.EMA_DECAY, 0.9977843871238888)
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    ema.register_buffer("marker", torch.zeros(1))
    model.register_buffer("marker", torch.ones(1))
    before = ema.weight.detach().clone()
    common.accumulate(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight.detach())
    assert ema.marker.item() == 0  # buffers are not averaged (rosinality)
    common.accumulate(ema, model, 0)
    assert torch.equal(ema.weight, model.weight)


# ------------------------------------------------------------------------------------------------
# runs


def test_rng_state_round_trip(tmp_path):
    runtime.seed_everything(5)
    state = runtime.get_rng_state()
    path = str(tmp_path / "rng.pt")
    runtime.save_checkpoint(path, {"rng": state, "iter": 0, "g": {}})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.seed_everything(99)
    runtime.set_rng_state(runtime.load_training_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    runtime.save_checkpoint(path, {"iter": 1, "g": {"w": torch.ones(2)}})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        runtime.save_checkpoint(path, {"iter": 2, "g": Unpicklable()})
    assert torch.load(path)["iter"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_run_dir_resume_and_log(tmp_path):
    run = runtime.RunDir(str(tmp_path / "run"))
    with pytest.raises(UserError, match="no checkpoint"):
        runtime.resolve_resume("auto", run)
    runtime.save_checkpoint(run.checkpoint_path(10), {"iter": 10, "g": {}})
    runtime.save_checkpoint(run.checkpoint_path(200), {"iter": 200, "g": {}})
    assert runtime.resolve_resume("auto", run).endswith("000200.pt")
    assert runtime.resolve_resume(None, run) is None
    with pytest.raises(UserError, match="not found"):
        runtime.resolve_resume(str(tmp_path / "x.pt"), run)
    torch.save({"g_ema": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="cannot resume"):
        runtime.load_training_checkpoint(str(tmp_path / "foreign.pt"))

    log = runtime.CSVLog(run.log_path)
    for i in range(5):
        log.write(i, {"d": i * 0.5, "g": torch.tensor(1.0 + i)})
    resumed = runtime.CSVLog(run.log_path, resume_from=3)
    resumed.write(3, {"d": 9.0, "g": 9.0})
    lines = open(run.log_path).read().split()
    assert lines == ["iter,d,g", "0,0,1", "1,0.5,2", "2,1,3", "3,9,9"]


def test_comparison_grid_png(tmp_path):
    source = torch.rand(4, 3, 8, 8) * 2 - 1
    adapted = -torch.ones(4, 3, 8, 8)
    path = str(tmp_path / "grid.png")
    runtime.save_comparison_grid(path, source, adapted)
    image = np.asarray(Image.open(path))
    # two 2x2 grids of 8-px images with 2-px padding (22 px square) and an 8-px white gap
    assert image.shape == (22, 22 + 8 + 22, 3)
    assert (image[:, 22:30] == 255).all()
    assert (image[2:10, 32:40] == 0).all()  # adapted images are black


def test_device_and_args():
    assert runtime.resolve_device("cpu").type == "cpu"
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")
    with pytest.raises(UserError):
        runtime.resolve_device("tpu")
    import argparse

    parser = runtime.add_common_args(argparse.ArgumentParser(), iter=100)
    args = parser.parse_args(["--source", "s.pt", "--target", "t", "--resume"])
    assert args.iter == 100 and args.batch == 4 and args.resume == "auto" and args.n_sample == 25
    args.batch = 0
    with pytest.raises(UserError, match="--batch"):
        runtime.check_common_args(args)


def test_run_main_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nimport common\nimport runtime\n"
        "def main(argv):\n    common.ImageFolder('/definitely/missing', 8)\n"
        "runtime.run_main(main)\n" % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: target not found: /definitely/missing"


def test_training_state_round_trip(tmp_path):
    import argparse

    def build():
        g = Generator(16, style_dim=8, n_mlp=1, channel_cap=8)
        g_ema = Generator(16, style_dim=8, n_mlp=1, channel_cap=8)
        d = Discriminator(16, channel_cap=8)
        return g, g_ema, d, common.make_adam(g.parameters(), 0.002, 4), common.make_adam(d.parameters(), 0.002, 16)

    g, g_ema, d, g_optim, d_optim = build()
    g(([torch.randn(2, 8)]))[0].mean().backward()
    g_optim.step()
    args = argparse.Namespace(iter=10, lr=0.002, target="t", resume=None, device=torch.device("cpu"))
    path = str(tmp_path / "000007.pt")
    runtime.save_checkpoint(path, runtime.training_state(7, args, g, g_ema, d, g_optim, d_optim, anchors=torch.ones(3, 8)))
    expected_draw = torch.rand(3)

    from checkpoints import load_checkpoint

    models, raw = load_checkpoint(path)  # our checkpoints stay readable as rosinality checkpoints
    assert set(models) == {"g", "g_ema", "d"} and raw["args"]["iter"] == 10 and "device" not in raw["args"]

    g2, g_ema2, d2, g_optim2, d_optim2 = build()
    start = runtime.restore_training_state(runtime.load_training_checkpoint(path), g2, g_ema2, d2, g_optim2, d_optim2)
    assert start == 7
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the moment of saving
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g2.state_dict().values()))
    assert torch.equal(g_optim.state_dict()["state"][0]["exp_avg_sq"], g_optim2.state_dict()["state"][0]["exp_avg_sq"])
    wrong = Generator(32, style_dim=8, n_mlp=1, channel_cap=8)
    with pytest.raises(UserError, match="does not match"):
        runtime.restore_training_state(runtime.load_training_checkpoint(path), wrong, g_ema2, d2, g_optim2, d_optim2)


def test_format_losses_and_progress():
    assert runtime.format_losses({"d": 1.23456, "g": torch.tensor(0.5)}) == "d 1.235 g 0.5"
    bar = runtime.progress_bar(3, 10)
    assert list(bar) == list(range(3, 10)) and bar.total == 10


def test_lpips_random_backbone_and_missing_weights(monkeypatch, tmp_path):
    model = common.load_lpips("vgg", random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(model(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    assert (model(x, y) > 0).all()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # never download in tests
    with pytest.raises(UserError, match="vgg16-397923af.pth") as info:
        common.load_lpips("vgg")
    assert "\n" not in str(info.value)
