"""rssa.py: L_scc's chunked form against rssa's plain one, L_dcc against a direct computation in the official
form, the compression P, the inversion, and end-to-end tiny runs on CPU (files, code cache, bit-for-bit resume,
one-line errors)."""

import os
import random

import numpy as np
import pytest
from conftest import assert_cli_errors, standard_bad_inputs
import torch
import torch.nn.functional as F
from PIL import Image

import common
import rssa
import stylegan2
from common import UserError
from checkpoints import load_checkpoint
from stylegan2 import Generator



# ------------------------------------------------------------------------------------------------
# L_scc


def random_maps(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


@pytest.mark.parametrize("chunk", [rssa.GRAM_CHUNK_ELEMENTS, 50])
def test_scc_equals_official_form_value_and_gradient(chunk):
    """The chunked autograd form (the training loop's) against rssa.self_correlation_loss_plain, the official
    computation: concatenate, normalise, adaptive-pool to H/2, unfold the 2x2 grid of H/4 windows, full Gram
    matrices, SmoothL1Loss; the same for the centre crop; summed over layers."""
    shapes = [(3, 6, 8, 8), (3, 5, 16, 16), (3, 4, 32, 32)]
    feats_src = random_maps(shapes, 1)
    feats_tgt = [(f + 0.5 * n).requires_grad_() for f, n in zip(feats_src, random_maps(shapes, 2))]
    ours = rssa.self_correlation_loss(feats_src, feats_tgt, chunk_elements=chunk)
    ours.backward()
    grads = [f.grad.clone() for f in feats_tgt]
    for f in feats_tgt:
        f.grad = None
    expected = rssa.self_correlation_loss_plain(feats_src, feats_tgt)
    expected.backward()
    assert torch.allclose(ours, expected, rtol=1e-5) and ours.item() > 0
    for ours_grad, f in zip(grads, feats_tgt):
        assert torch.allclose(ours_grad, f.grad, rtol=1e-4, atol=1e-10)


def test_scc_linear_branch_of_smooth_l1():
    # source: one vector everywhere (every correlation 1); target: +v / -v on alternating 2x2 blocks, so after
    # pooling the correlations are +-1 and half the differences are -2, in smooth-L1's linear part
    v = F.normalize(torch.randn(1, 4, 1, 1), dim=1)
    feats_src = [v.expand(2, 4, 16, 16).clone()]
    sign = torch.ones(8, 8)
    sign[::2, 1::2] = sign[1::2, ::2] = -1
    sign = sign.repeat_interleave(2, 0).repeat_interleave(2, 1)
    feats_tgt = [(v * sign).expand(2, 4, 16, 16).clone().requires_grad_()]
    ours = rssa.self_correlation_loss(feats_src, feats_tgt, chunk_elements=7)
    assert torch.allclose(ours, rssa.self_correlation_loss_plain(feats_src, feats_tgt), rtol=1e-6)
    assert ours.item() == pytest.approx(2 * 0.5 * 1.5, rel=1e-5)  # half the entries at smoothL1(-2) = 1.5, two terms


def test_scc_zero_for_identical_and_gradient_only_to_target():
    shapes = [(2, 4, 8, 8), (2, 4, 16, 16)]
    feats = random_maps(shapes, 3)
    assert rssa.self_correlation_loss(feats, [f.clone() for f in feats]).abs().item() < 1e-12
    feats_src = [f.requires_grad_() for f in random_maps(shapes, 4)]
    feats_tgt = [f.requires_grad_() for f in random_maps(shapes, 5)]
    for loss in (rssa.self_correlation_loss, rssa.self_correlation_loss_plain):
        for f in feats_tgt:
            f.grad = None
        loss(feats_src, feats_tgt).backward()
        assert all(f.grad is None for f in feats_src) and all(f.grad.abs().sum() > 0 for f in feats_tgt)


# ------------------------------------------------------------------------------------------------
# L_dcc


def dcc_direct(feats_src, feats_tgt, grids):
    """The official loops: per anchor j, the samples k > j, windows by unfold, row softmax of the cosine matrix,
    L1Loss (a mean) times (N - 1 - j) and n, summed over anchors and divided by the number of pairs."""
    total = 0
    for f_s, f_t, grid in zip(feats_src, feats_tgt, grids):
        n_samples, c, h, _ = f_s.shape
        k = h // grid
        probs = []
        for f in (f_s, f_t):
            x = F.unfold(F.normalize(f, dim=1), k, stride=k).reshape(n_samples, c, k * k, grid * grid)
            x = x.permute(0, 3, 2, 1)  # [N, P, n, C]
            per_anchor = []
            for j in range(n_samples - 1):
                rows = [torch.softmax(x[j] @ x[m].transpose(1, 2), dim=2) for m in range(j + 1, n_samples)]
                per_anchor.append(torch.stack(rows))
            probs.append(per_anchor)
        layer = 0
        for j in range(n_samples - 1):
            layer = layer + torch.nn.L1Loss()(probs[1][j], probs[0][j]) * (n_samples - 1 - j) * k * k
        total = total + layer / (n_samples * (n_samples - 1) // 2)
    return total


@pytest.mark.parametrize("n_samples", [4, 3])
def test_dcc_equals_official_loops(n_samples):
    shapes = [(n_samples, 6, 4, 4), (n_samples, 6, 8, 8), (n_samples, 5, 16, 16), (n_samples, 4, 32, 32)]
    grids = [1, 1, 4, 4]
    feats_src = random_maps(shapes, 6)
    feats_tgt = [(f + 0.5 * n).requires_grad_() for f, n in zip(feats_src, random_maps(shapes, 7))]
    ours = rssa.disturbance_correlation_loss(feats_src, feats_tgt, grids)
    ours.backward()
    grads = [f.grad.clone() for f in feats_tgt]
    for f in feats_tgt:
        f.grad = None
    expected = dcc_direct(feats_src, feats_tgt, grids)
    expected.backward()
    assert torch.allclose(ours, expected, rtol=1e-5) and ours.item() > 0
    for ours_grad, f in zip(grads, feats_tgt):
        assert torch.allclose(ours_grad, f.grad, rtol=1e-4, atol=1e-9)


def test_dcc_zero_for_identical_and_gradient_only_to_target():
    feats = random_maps([(4, 4, 8, 8), (4, 4, 16, 16)], 8)
    assert rssa.disturbance_correlation_loss(feats, [f.clone() for f in feats], [1, 4]).abs().item() < 1e-12
    feats_src = [f.requires_grad_() for f in random_maps([(4, 4, 8, 8)], 9)]
    feats_tgt = [f.requires_grad_() for f in random_maps([(4, 4, 8, 8)], 10)]
    rssa.disturbance_correlation_loss(feats_src, feats_tgt, [2]).backward()
    assert feats_src[0].grad is None and feats_tgt[0].grad.abs().sum() > 0


def test_official_layers_and_windows_at_256px():
    g = Generator(256, style_dim=8, n_mlp=1, channel_cap=4)
    scc, dcc, grids = rssa.structure_layers(g)
    assert scc == [7, 8, 9, 10, 11, 12]
    assert dcc == list(range(10)) and grids == [1] * 7 + [4] * 3


# ------------------------------------------------------------------------------------------------
# compression P


def test_official_blend_tables_at_256px():
    face = rssa.slot_blend("face", 14, 256).tolist()
    church = rssa.slot_blend("church", 14, 256).tolist()
    assert face == pytest.approx([0, 0, 0, 0.05, 0.05, 0.05, 0.05, 0.45, 0.45, 0.65, 0.65, 0.85, 0.85, 0.85])
    assert church == pytest.approx([0, 0, 0, 0.05, 0.05, 0.05, 0.05, 0.35, 0.35, 0.55, 0.55, 0.75, 0.75, 0.75])
    assert rssa.slot_blend("0,0.5,1,1", 4, 8).tolist() == [0, 0.5, 1, 1]
    with pytest.raises(UserError):
        rssa.slot_blend("0,0.5", 4, 8)


def test_projectors_equal_official_formula_and_compression():
    codes = torch.randn(5, 3, 16)  # N = 5 codes, 3 slots, D = 16
    projectors = rssa.span_projectors(codes)
    for slot in range(3):
        a = codes[:, slot].t().double()  # [D, N]
        official = a @ torch.inverse(a.t() @ a) @ a.t()
        assert torch.allclose(projectors[slot].double(), official, atol=1e-5)
    # a w inside the span stays as it is, for any blend
    inside = torch.einsum("bn,nld->bld", torch.randn(4, 5), codes)  # [4, 3, 16]
    blend = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(rssa.compress_latents(inside, projectors, blend), inside, atol=1e-4)
    # with blend 1 any w lands in the span (and keeps its norm); with blend 0 it is unchanged
    w = torch.randn(6, 16)
    full = rssa.compress_latents(w, projectors, torch.ones(3))  # [6, 3, 16]
    assert torch.allclose(torch.einsum("lde,ble->bld", projectors, full), full, atol=1e-4)
    assert torch.allclose(full.norm(dim=2), w.norm(dim=1, keepdim=True).expand(6, 3), rtol=1e-5)
    assert torch.equal(rssa.compress_latents(w, projectors, torch.zeros(3)), w[:, None].expand(6, 3, 16))
    # rank-deficient codes: the projector onto their (smaller) span
    twice = torch.cat([codes[:2], codes[:2]])
    assert torch.allclose(rssa.span_projectors(twice), rssa.span_projectors(codes[:2]), atol=1e-5)


def official_wplus_latent(styles, n_latent):
    """The latent the official Generator.forward (model.py) builds from W+ styles with input_is_latent=True:
    inject_index = n_latent, so a single code is used as it is and a pair gives cat(s0[:, :n_latent], s1[:, n_latent:])."""
    inject_index = n_latent
    if len(styles) < 2:
        return styles[0]
    return torch.cat([styles[0][:, :inject_index], styles[1][:, inject_index:]], 1)


class OfficialWPlusGenerator(Generator):
    """A generator with the official W+ input semantics (a list of W+ codes, combined as official_wplus_latent)."""

    def forward(self, styles, input_is_latent=False, **kwargs):
        if input_is_latent:
            styles = [official_wplus_latent(styles, self.n_latent)]
        return super().forward(styles, input_is_latent=input_is_latent, **kwargs)


def test_wplus_pair_is_the_first_code_as_the_official_generator_unless_mixing_fix():
    torch.manual_seed(0)
    g = OfficialWPlusGenerator(32, style_dim=16, n_mlp=2, channel_cap=16).eval().requires_grad_(False)
    n_latent = g.n_latent
    projectors = rssa.span_projectors(torch.randn(3, n_latent, 16))  # [L, D, D]
    blend = rssa.slot_blend("face", n_latent, 32)  # [L]
    zs = list(torch.randn(2, 4, 16).unbind(0))  # the two z of mixing_noise
    # official D / G step: w = [P(G.style(z)) for z in noise], G(w, input_is_latent=True)
    official_w = [rssa.compress_latents(g.style(z), projectors, blend) for z in zs]  # 2 x [4, L, 16]
    official_img = g(official_w, input_is_latent=True, randomize_noise=False)[0]
    state = random.getstate()
    ours = rssa.latents_wplus(g, zs, projectors, blend)  # [4, L, 16]
    assert random.getstate() == state  # no inject index drawn, as the official W+ path
    assert torch.equal(ours, official_w[0]) and torch.equal(ours, official_wplus_latent(official_w, n_latent))
    assert torch.equal(g([ours], input_is_latent=True, randomize_noise=False)[0], official_img)
    # --mixing-fix: a crossover at k ~ U{1 .. L-1}, drawn from Python's random
    random.seed(3)
    mixed = rssa.latents_wplus(g, zs, projectors, blend, mixing=True)
    random.seed(3)
    k = random.randint(1, n_latent - 1)
    assert torch.equal(mixed, torch.cat([official_w[0][:, :k], official_w[1][:, k:]], 1))
    assert not torch.equal(mixed[:, k:], official_w[0][:, k:])
    # without P (blend 0 everywhere) the fix is StyleGAN2's z mixing, the same Python random draw
    random.seed(5)
    z_mixed = g(zs, randomize_noise=False)[0]
    random.seed(5)
    w_mixed = rssa.latents_wplus(g, zs, projectors, torch.zeros(n_latent), mixing=True)
    assert torch.allclose(g([w_mixed], input_is_latent=True, randomize_noise=False)[0], z_mixed, atol=1e-6)


def test_span_rule_and_official_choose_idx():
    names = ["a.png", "b.jpg", "c.png"]
    assert rssa.span_indices("all", names) == [0, 1, 2]
    assert rssa.span_indices("c.png,b", names) == [2, 1]
    for bad in ["d", "a,a.png"]:
        with pytest.raises(UserError, match="--span"):
            rssa.span_indices(bad, names)
    # run.sh's caricatures 5-shot line: choose_idx [1, 3, 4, 6, 8] into the listdir order of the shipped
    # latents (the spec's index -> file table) are the preset's five files
    listdir = [f"{n}.png" for n in (91, 98, 99, 97, 94, 93, 90, 92, 96, 95)]
    preset = rssa.PRESETS["face2caricatures-5shot"]
    assert sorted(rssa.span_indices(preset.span, listdir)) == [1, 3, 4, 6, 8]
    assert (preset.iters, preset.n_train) == (1501, 5)
    assert all(p.span == "all" for k, p in rssa.PRESETS.items() if k != "face2caricatures-5shot")


# ------------------------------------------------------------------------------------------------
# inversion


@pytest.fixture(scope="module")
def lpips_random():
    return common.load_lpips("vgg", random_backbone=True)


def test_inversion_reduces_its_loss_and_batches_exactly(lpips_random):
    torch.manual_seed(0)
    g = Generator(32, style_dim=16, n_mlp=2, channel_cap=16).eval().requires_grad_(False)
    with torch.no_grad():
        images = g([torch.randn(2, 16)], randomize_noise=False)[0]  # reachable targets
    torch.manual_seed(1)
    codes, history = common.invert_wplus(g, images, lpips_random, steps=12, lr=0.1)
    assert codes.shape == (2, g.n_latent, 16) and history.shape == (12, 2)
    assert torch.all(history[-1] < 0.8 * history[0]), history[[0, -1]]
    # one batched run = one run per image (same w_avg): the same losses at every step (the codes agree too,
    # except where a gradient entry is at rounding-noise level and Adam's first steps normalise it to +-lr)
    torch.manual_seed(1)
    _, alone = common.invert_wplus(g, images[1:], lpips_random, steps=3, lr=0.1)
    assert torch.allclose(alone[:, 0], history[:3, 1], rtol=1e-4)


def test_official_inversion_input_is_a_nearest_stretch(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 6 x 10, not square
    Image.fromarray(array).save(tmp_path / "wide.png")
    ours = rssa.stretched_image(str(tmp_path / "wide.png"), 4)
    rows, cols = [0, 1, 3, 4], [0, 2, 5, 7]  # nearest source pixel: floor(i * in / out)
    expected = torch.from_numpy(array[rows][:, cols].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(ours, expected)


def official_saved_code(g, image, lpips_fn, iter_num, save_every):
    """invert_gan.py's loop for one image: w_avg start, Adam(0.1) and StepLR(1000, 0.5) stepped every step, and
    the code saved after the update of each step with step % save_every == 0; returns the last saved code."""
    with torch.no_grad():
        w_avg = g.style(torch.randn(common.INVERT_MEAN_SAMPLES, g.style_dim)).mean(0)  # [D]
    latent = w_avg.repeat(1, g.n_latent, 1).requires_grad_(True)  # [1, L, D]
    optim = torch.optim.Adam([latent], lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optim, 1000, 0.5)
    for step in range(iter_num):
        recon = g([latent], input_is_latent=True, randomize_noise=False)[0]
        loss = lpips_fn(recon, image).mean() + F.mse_loss(recon, image)
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
        if step % save_every == 0:
            saved = latent.detach().clone()
    return saved


def test_inversion_step_count_is_the_official_saved_code(lpips_random, tmp_path):
    # official: --iter_num 4002, saved every 500 steps after the update, so the last code has 4001 updates
    args = rssa.parse_args(["--source", "s.pt", "--target", "t", "--out", str(tmp_path / "out")])
    assert args.invert_steps == max(s for s in range(4002) if s % 500 == 0) + 1 == 4001
    # the same rule at a small scale: iter_num 4, saved every 2 -> the code after step 2, i.e. 3 updates
    torch.manual_seed(0)
    g = Generator(32, style_dim=16, n_mlp=2, channel_cap=16).eval().requires_grad_(False)
    with torch.no_grad():
        image = g([torch.randn(1, 16)], randomize_noise=False)[0]  # [1, 3, 32, 32]
    torch.manual_seed(1)
    official = official_saved_code(g, image, lpips_random, iter_num=4, save_every=2)
    torch.manual_seed(1)
    ours, _ = common.invert_wplus(g, image, lpips_random, steps=3, lr=0.1)
    # (one update more or less moves every entry by about lr: Adam's early steps are +-lr)
    assert torch.allclose(ours, official, atol=1e-6)


def test_user_run_never_falls_back_to_random_lpips(setup, monkeypatch, tmp_path):
    import urllib.error

    import torchvision.models._api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # never download in tests
    root, source, target = setup
    argv = ["--source", source, "--target", target, "--out", str(tmp_path / "out"), "--device", "cpu", "--iter", "1"]
    with pytest.raises(UserError, match="vgg16-397923af.pth") as info:
        rssa.main(argv)
    assert "\n" not in str(info.value) and not os.path.exists(tmp_path / "out" / "target_codes.pt")


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


@pytest.fixture
def shared_lpips(lpips_random, monkeypatch):
    """The end-to-end runs take the module's random-backbone LPIPS instead of building one each (same weights)."""

    def load(net, device, random_backbone=False):
        assert net == "vgg" and random_backbone  # --lpips-random-backbone reaches the loader
        return lpips_random

    monkeypatch.setattr(common, "load_lpips", load)


def run_rssa(source, target, out, *extra):
    argv = ["--source", source, "--target", target, "--out", str(out), "--batch", "2", "--n-sample", "4", "--device", "cpu",
            "--invert-steps", "2", "--lpips-random-backbone", "--dcc-every", "2", *extra]
    return rssa.main(argv)


def test_end_to_end_files_cache_and_checkpoint(setup, shared_lpips, capsys):
    root, source, target = setup
    out = root / "run"
    path = run_rssa(source, target, out, "--iter", "5", "--sample-every", "3", "--save-every", "4")
    assert sorted(os.listdir(out)) == ["checkpoints", "log.csv", "samples", "target_codes.png", "target_codes.pt"]
    assert sorted(os.listdir(out / "checkpoints")) == ["000004.pt", "000005.pt"]
    assert sorted(os.listdir(out / "samples")) == [
        "000000.png", "000003.png", "000005.png", "anchors_000000.png", "anchors_000003.png", "anchors_000005.png"
    ]
    rows = [r.split(",") for r in open(out / "log.csv").read().split()]
    assert rows[0] == ["iter", "d", "g", "scc", "dcc", "r1", "path", "mean_path"] and len(rows) == 6
    # at iteration 0 G_t = G_s, so both losses are 0; then L_scc on every iteration and L_dcc on every 2nd here
    assert [float(r[3]) > 0 for r in rows[1:]] == [False, True, True, True, True]
    assert [float(r[4]) > 0 for r in rows[1:]] == [False, False, True, False, True]
    models, raw = load_checkpoint(path)
    assert raw["iter"] == 5 and raw["latent_codes"].shape == (5, 8, 16) and raw["blend"].shape == (8,)
    cache = torch.load(out / "target_codes.pt", weights_only=True)
    assert cache["files"] == [f"{k}.png" for k in range(5)] and torch.equal(cache["codes"], raw["latent_codes"])
    source_g = load_checkpoint(source)[0]["g_ema"]
    changed = [not torch.equal(a, b) for a, b in zip(source_g.state_dict().values(), models["g"].state_dict().values())]
    assert any(changed)
    # evaluate.py (and the testbed) sample the adapted model as RSSA does: g_ema behind P
    import evaluate

    adapted = evaluate.load_generator(path, "cpu")
    assert isinstance(adapted, rssa.CompressedGenerator) and adapted.size == 32 and adapted.style_dim == 16
    z = torch.randn(3, 16)
    noise = [getattr(models["g_ema"].noises, f"noise_{k}") for k in range(models["g_ema"].num_layers)]
    projectors = rssa.span_projectors(raw["latent_codes"])
    with torch.no_grad():
        w_plus = rssa.compress_latents(models["g_ema"].style(z), projectors, raw["blend"])  # [3, n_latent, D]
        expected = models["g_ema"]([w_plus], input_is_latent=True, noise=noise)[0]
        without_p = models["g_ema"]([z], noise=noise)[0]
    images = evaluate.generate(adapted, z, 2, noise=noise).float()
    assert (images - evaluate.to_uint8(expected).float()).abs().max() <= 1
    assert (images - evaluate.to_uint8(without_p).float()).abs().mean() > 1
    # a second run in the same folder reuses the codes; other settings need --reinvert
    capsys.readouterr()
    run_rssa(source, target, out, "--iter", "1", "--overwrite")
    assert "using the cached target codes" in capsys.readouterr().out
    with pytest.raises(UserError, match="--reinvert"):
        run_rssa(source, target, out, "--iter", "1", "--invert-steps", "1", "--overwrite")
    run_rssa(source, target, out, "--iter", "1", "--invert-steps", "1", "--reinvert", "--overwrite")
    assert torch.load(out / "target_codes.pt", weights_only=True)["settings"]["steps"] == 1


@pytest.mark.parametrize("mixing_fix", [False, True])
def test_training_steps_mix_only_with_the_fix_and_p_spans_the_chosen_codes(setup, shared_lpips, monkeypatch, mixing_fix):
    """Spies on a tiny run (--mixing 1: a second z on every patch iteration): the W+ code of each D / G step is
    P(G.style(z0)) as the official generator makes it (default), or a crossover of P(z0) and P(z1) (--mixing-fix)."""
    root, source, target = setup
    drawn, checked, captured = [], [], {}
    mixing_noise, forward, span_projectors = common.mixing_noise, stylegan2.Generator.forward, rssa.span_projectors

    def spy_mixing_noise(*args):
        zs = mixing_noise(*args)
        drawn.append(zs)
        return zs

    def spy_projectors(codes):
        captured["codes"] = codes
        captured["projectors"] = span_projectors(codes)
        return captured["projectors"]

    def spy_forward(self, styles, **kwargs):
        if kwargs.get("input_is_latent") and not kwargs.get("return_feats") and not kwargs.get("return_latents") and drawn:
            zs = drawn.pop()
            assert len(zs) == 2  # the second z is still drawn, as the official mixing_noise
            with torch.no_grad():
                w0, w1 = [rssa.compress_latents(self.style(z), captured["projectors"], blend) for z in zs]  # [B, L, D]
            latent = styles[0]  # [B, L, D]
            crossings = [k for k in range(1, self.n_latent) if torch.equal(latent[:, :k], w0[:, :k]) and torch.equal(latent[:, k:], w1[:, k:])]
            assert len(crossings) == 1 if mixing_fix else torch.equal(latent, w0)
            checked.append(latent.shape)
        return forward(self, styles, **kwargs)

    monkeypatch.setattr(common, "mixing_noise", spy_mixing_noise)
    monkeypatch.setattr(rssa, "span_projectors", spy_projectors)
    monkeypatch.setattr(stylegan2.Generator, "forward", spy_forward)
    blend = rssa.slot_blend("face", 8, 32)
    out = root / f"mixing-{mixing_fix}"
    flags = ["--mixing-fix"] if mixing_fix else []
    path = run_rssa(source, target, out, "--iter", "2", "--mixing", "1", "--span", "1,3.png", "--invert-steps", "1", *flags)
    assert checked == [(2, 8, 16)] * 2  # iteration 1 (a patch iteration): the D step and the G step
    # P is spanned by the codes of 1.png and 3.png only, and the checkpoint keeps those
    codes = torch.load(out / "target_codes.pt", weights_only=True)["codes"]  # [5, L, D], every target image
    assert torch.equal(captured["codes"].cpu(), codes[[1, 3]])
    assert torch.equal(torch.load(path, weights_only=True)["latent_codes"], codes[[1, 3]])


def test_resume_is_bit_for_bit(setup, shared_lpips):
    root, source, target = setup
    common_args = ["--save-every", "100", "--sample-every", "100"]
    straight = run_rssa(source, target, root / "straight", "--iter", "6", *common_args)
    run_rssa(source, target, root / "resumed", "--iter", "3", *common_args)
    os.remove(root / "resumed" / "target_codes.pt")  # the resumed run takes P's codes from the checkpoint
    resumed = run_rssa(source, target, root / "resumed", "--iter", "6", *common_args, "--resume")
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["mean_path_length"], b["mean_path_length"]) and torch.equal(a["latent_codes"], b["latent_codes"])
    assert open(root / "straight" / "log.csv").read() == open(root / "resumed" / "log.csv").read()


@pytest.mark.parametrize(
    "flags",
    [
        ["--dcc-latents", "disturbed", "--dcc-compress", "--path-latents", "fresh", "--feat-const-batch", "3",
         "--invert-resize", "training", "--blend", "church"],
        ["--no-compress", "--no-scc", "--blend", "0,0,0,0,0,0.5,1,1"],
    ],
)
def test_fix_and_ablation_flags(setup, shared_lpips, flags):
    root, source, target = setup
    out = root / ("flags-" + flags[0].strip("-"))
    run_rssa(source, target, out, "--iter", "2", *flags)
    rows = [r.split(",") for r in open(out / "log.csv").read().split()[1:]]
    assert (float(rows[1][3]) > 0) == ("--no-scc" not in flags)  # iteration 1 (at 0, G_t = G_s)
    assert os.path.exists(out / "target_codes.pt") == ("--no-compress" not in flags)
    import evaluate

    adapted = evaluate.load_generator(str(out / "checkpoints" / "000002.pt"), "cpu")
    assert isinstance(adapted, rssa.CompressedGenerator) == ("--no-compress" not in flags)
    if "--no-scc" in flags:  # without L_scc the official code runs L_dcc on every iteration
        assert float(rows[1][4]) > 0


def test_bad_input_one_line_errors(setup, tmp_path):
    root, source, target = setup
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out"), "--lpips-random-backbone"]
    cases = standard_bad_inputs(tmp_path, source, target)
    assert_cli_errors("rssa.py", cases, base)
