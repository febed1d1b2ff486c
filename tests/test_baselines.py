"""baselines.py: the pure pieces (EWC's penalty and Fisher, ADA's pipeline and p update, FreezeD's frozen set, BSA's
scale / shift hooks) against direct computations, and end-to-end tiny runs of every baseline on CPU."""

import math

import pytest
import torch
from conftest import assert_cli_errors, standard_bad_inputs

import baselines
from checkpoints import load_checkpoint
from stylegan2 import Discriminator

# ------------------------------------------------------------------------------------------------
# EWC


def test_ewc_fisher_per_sample_does_not_depend_on_the_batch(setup):
    _, source, _ = setup
    models = load_checkpoint(source)[0]
    cpu = torch.device("cpu")

    def mean_fisher(batch, per_sample):  # 64 generated samples in batches of `batch`
        fisher = baselines.estimate_fisher(models["g"], models["d"], 64 // batch, batch, 1, cpu, per_sample=per_sample)
        return float(sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values()))

    per_sample = [mean_fisher(b, True) for b in (2, 8)]
    batch_mean = [mean_fisher(b, False) for b in (2, 8)]
    assert 1 / 1.5 < per_sample[0] / per_sample[1] < 1.5  # the paper's expectation over samples: about equal
    assert batch_mean[0] / batch_mean[1] > 2.5  # the squared gradient of a batch mean: about 1 / batch
    assert baselines.parse_args(["--baseline", "ewc"]).ewc_fisher == "per-sample"


def test_ewc_fisher_and_penalty_equal_direct_computation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    params = list(net.parameters())
    batches = [torch.randn(5, 3) for _ in range(3)]
    fisher = baselines.fisher_diagonal(params, (torch.nn.functional.softplus(-net(x)).mean() for x in batches))
    # direct: the squared gradient of each batch's loss, parameter by parameter, averaged over the batches
    expected = [torch.zeros_like(p) for p in params]
    for x in batches:
        net.zero_grad()
        torch.nn.functional.softplus(-net(x)).mean().backward()
        for e, p in zip(expected, params):
            e += p.grad.pow(2) / len(batches)
    assert all(torch.allclose(f, e, rtol=1e-5, atol=1e-10) for f, e in zip(fisher, expected))
    # sum_i F_i (theta_i - theta_s,i)^2, element by element
    source = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    direct = sum(float(f.flatten()[k].detach()) * (float(p.flatten()[k].detach()) - float(s.flatten()[k])) ** 2
                 for p, s, f in zip(params, source, fisher) for k in range(p.numel()))
    assert math.isclose(float(baselines.ewc_penalty(params, source, fisher).detach()), direct, rel_tol=1e-5)
    assert float(baselines.ewc_penalty(params, [p.detach() for p in params], fisher).detach()) == 0


# ------------------------------------------------------------------------------------------------
# ADA


def test_ada_p_zero_is_the_identity_and_p_one_applies_every_transform():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    state = torch.get_rng_state()
    assert baselines.ada_augment(images, 0.0, baselines.ADA_PIPES["bgc"]) is images
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    _, applied = baselines.ada_draw(64, 1.0, baselines.ADA_PIPES["bgc"])
    expected = {"xflip", "rotate90", "xint", "scale", "rotate_pre", "aniso", "rotate_post", "xfrac",
                "brightness", "contrast", "lumaflip", "hue", "saturation"}
    assert set(applied) == expected and all(mask.all() for mask in applied.values())
    _, applied = baselines.ada_draw(64, 0.0, baselines.ADA_PIPES["bgc"])
    assert not any(mask.any() for mask in applied.values())
    assert not torch.allclose(baselines.ada_augment(images, 1.0, baselines.ADA_PIPES["bgc"]), images)
    assert baselines.ada_transforms("bgc", "rotate90")[0] == tuple(t for t in baselines.ADA_PIPES["bgc"] if t != "rotate90")


def test_ada_transforms_are_invertible_and_blits_move_pixels_exactly():
    one, b = torch.ones(3), torch.tensor([0.3, -1.2, 2.0])
    eye3, eye4 = torch.eye(3).expand(3, 3, 3), torch.eye(4).expand(3, 4, 4)
    geometric = [({"xflip": one}, {"xflip": one}), ({"rotate90": one}, {"rotate90": 3 * one}),
                 ({"xint": torch.full((3, 2), 0.125)}, {"xint": torch.full((3, 2), -0.125)}),
                 ({"scale": b.exp()}, {"scale": (-b).exp()}), ({"rotate_pre": b}, {"rotate_pre": -b}),
                 ({"aniso": b.exp()}, {"aniso": (-b).exp()}), ({"xfrac": torch.stack([b, -b], 1)}, {"xfrac": torch.stack([-b, b], 1)})]
    for forward, inverse in geometric:
        product = baselines.ada_geometric_matrix(forward, 16, 16) @ baselines.ada_geometric_matrix(inverse, 16, 16)
        assert torch.allclose(product, eye3, atol=1e-5), forward
    colour = [({"brightness": b}, {"brightness": -b}), ({"contrast": b.exp()}, {"contrast": (-b).exp()}),
              ({"lumaflip": one}, {"lumaflip": one}), ({"hue": b}, {"hue": -b}), ({"saturation": b.exp()}, {"saturation": (-b).exp()})]
    for forward, inverse in colour:
        product = baselines.ada_color_matrix(forward) @ baselines.ada_color_matrix(inverse)
        assert torch.allclose(product, eye4, atol=1e-5), forward
    # through the resampling pipeline (smooth images: ADA's sym6 filter has a non-linear phase, so a flip or a quarter
    # turn lands within a fraction of a pixel, and a pair of them undoes itself up to the filter's smoothing)
    images = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    two = torch.ones(2)

    def run(x, params):
        return baselines.ada_apply_geometric(x, baselines.ada_geometric_matrix(params, 16, 16))

    assert torch.allclose(run(images, {"xflip": two}), images.flip(3), atol=0.06)
    assert torch.allclose(run(images, {"rotate90": two}), torch.rot90(images, 1, [2, 3]), atol=0.06)
    assert torch.allclose(run(run(images, {"xflip": two}), {"xflip": two}), images, atol=1e-2)
    assert torch.allclose(run(run(images, {"rotate90": two}), {"rotate90": 3 * two}), images, atol=1e-2)
    assert torch.allclose(run(images, {"xint": torch.tensor([[0.125, 0.0]] * 2)})[..., 2:], images[..., :-2], atol=1e-5)
    assert torch.allclose(run(images, {"rotate_pre": torch.zeros(2)}), images, atol=1e-5)
    hue = baselines.ada_color_matrix({"hue": torch.tensor([0.7, 0.7])})
    back = baselines.ada_apply_color(baselines.ada_apply_color(images, hue), baselines.ada_color_matrix({"hue": torch.tensor([-0.7, -0.7])}))
    assert torch.allclose(back, images, atol=1e-5)


def test_ada_p_update_sign_step_and_floor():
    step = 4 * 4 / (500 * 1000)  # batch * interval / (ada_kimg * 1000)
    assert baselines.ada_update_p(0.1, 0.9, 0.6, 4, 4, 500) == pytest.approx(0.1 + step)
    assert baselines.ada_update_p(0.1, 0.2, 0.6, 4, 4, 500) == pytest.approx(0.1 - step)
    assert baselines.ada_update_p(0.0, -1.0, 0.6, 4, 4, 500) == 0.0


# ------------------------------------------------------------------------------------------------
# FreezeD, BSA's hooks


def test_freezed_names_the_input_side_blocks():
    d = Discriminator(32, channel_cap=16)  # FromRGB + 3 ResBlocks (32->16, 16->8, 8->4)
    assert baselines.default_freeze_d(32) == 1 and baselines.default_freeze_d(256) == 4
    assert baselines.freezed_parameter_names(d, 0) == set()
    names = baselines.freezed_parameter_names(d, 2)
    assert names == {n for n, _ in d.named_parameters() if n.split(".")[:2] in (["convs", "0"], ["convs", "1"], ["convs", "2"])}
    with pytest.raises(baselines.UserError, match="3 blocks"):
        baselines.freezed_parameter_names(d, 4)


def test_bsa_hooks_scale_and_shift_the_styled_conv_outputs(setup):
    _, source, _ = setup
    g = load_checkpoint(source, require=("g_ema",))[0]["g_ema"]
    z = torch.randn(2, g.style_dim)
    _, plain = g([z], randomize_noise=False, return_feats=True)
    scale_shift = baselines.ScaleShift(g)
    scale_shift.install(g)
    image, feats = g([z], randomize_noise=False, return_feats=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, feats))  # gamma = 1, beta = 0: the identity
    with torch.no_grad():
        scale_shift.gamma[0].fill_(0.0)
        scale_shift.beta[0].fill_(0.5)
    # conv1: leaky_relu(gamma conv + noise + bias) * sqrt 2 with gamma = 0 is the same for every sample
    _, feats = g([z], randomize_noise=False, return_feats=True)
    assert torch.allclose(feats[0][0], feats[0][1]) and not torch.allclose(plain[0][0], plain[0][1])


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


def run(source, target, out, baseline, *extra):
    argv = ["--source", source, "--target", target, "--out", str(out), "--baseline", baseline, "--batch", "2",
            "--n-sample", "4", "--device", "cpu", "--sample-every", "100", "--save-every", "100", *extra]
    return baselines.main(argv)


def straight_and_resumed(source, target, straight_out, resumed_out, baseline, *extra):
    """The last checkpoints of a 2-iteration run and of a 1-iteration run resumed to 2."""
    straight = run(source, target, straight_out, baseline, "--iter", "2", *extra)
    run(source, target, resumed_out, baseline, "--iter", "1", "--save-every", "1", *extra)
    resumed = baselines.main(["--resume", str(resumed_out / "checkpoints" / "000001.pt"), "--iter", "2"])
    return torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)


def tensors(path, key):
    return torch.load(path, weights_only=False)[key]  # the source file holds an argparse.Namespace


def same(a, b):
    return all(torch.equal(t, b[name]) for name, t in a.items())


def test_tgan_and_ewc_weight_zero_are_bit_for_bit_equal(setup):
    root, source, target = setup
    tgan = run(source, target, root / "tgan", "tgan", "--iter", "1", "--sample-every", "1")
    ewc = run(source, target, root / "ewc0", "ewc", "--iter", "1", "--ewc-weight", "0", "--ewc-fisher-batches", "2")
    assert sorted(p.name for p in (root / "tgan" / "samples").iterdir()) == ["000000.png", "000001.png"]
    assert open(root / "tgan" / "log.csv").readline().strip() == "iter,d,g,r1,path,mean_path"
    for key in ("g", "g_ema", "d"):
        assert same(tensors(tgan, key), tensors(ewc, key)), key
    assert not same(tensors(tgan, "g"), tensors(source, "g"))
    assert open(root / "ewc0" / "log.csv").readline().strip().endswith(",ewc")  # the penalty is computed, weighted 0


def test_freezed_keeps_exactly_the_frozen_blocks(setup):
    root, source, target = setup
    path = run(source, target, root / "freezed", "freezed", "--iter", "1")  # default K at 32 px: 1
    before, after = tensors(source, "d"), tensors(path, "d")
    frozen = baselines.freezed_parameter_names(load_checkpoint(source)[0]["d"], 1)
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    trained = [n for n in dict(load_checkpoint(source)[0]["d"].named_parameters()) if n not in frozen]
    assert all(not torch.equal(before[n], after[n]) for n in trained)


def test_minegan_miner_phase_leaves_g_unchanged(setup):
    root, source, target = setup
    path = run(source, target, root / "minegan", "minegan", "--iter", "1", "--miner-hidden", "8")
    assert baselines.parse_args(["--baseline", "minegan"]).miner_iters == 1001  # official: G trains when i > 1000
    assert same(tensors(path, "g"), tensors(source, "g"))  # G frozen for the first --miner-iters
    assert not same(tensors(path, "d"), tensors(source, "d"))
    raw = torch.load(path, weights_only=True)
    assert raw["miner"]["transform.0.weight"].shape == (8, 16)
    channels = load_checkpoint(source)[0]["g"].input.input.shape[1]
    assert raw["input_miner"]["conv3.weight"].shape == (channels, 128, 1, 1)  # official: 8 -> 32 -> 128 -> C
    g = baselines.adapted_generator(path)
    assert len(g.input._forward_hooks) == 1
    plain = load_checkpoint(path, require=("g_ema",))[0]["g_ema"]
    z = torch.randn(2, 16)
    assert not torch.allclose(g([z], randomize_noise=False)[0], plain([z], randomize_noise=False)[0])
    # without the input miner: G's constant input, no hook
    path = run(source, target, root / "minegan-noinput", "minegan", "--iter", "1", "--miner-hidden", "8", "--no-input-miner")
    assert "input_miner" not in torch.load(path, weights_only=True)
    assert not baselines.adapted_generator(path).input._forward_hooks


def test_minegan_miner_gradients_accumulate_as_the_official_code_and_resume_exactly(setup):
    root, source, target = setup
    # iteration 0: the G step, then the path-length step (weight 0 here: it adds a zero gradient)
    flags = ["--miner-hidden", "8", "--path-regularize", "0"]
    summed = torch.load(run(source, target, root / "mg-sum", "minegan", "--iter", "1", *flags), weights_only=True)
    cleared = torch.load(run(source, target, root / "mg-clear", "minegan", "--iter", "1", *flags, "--miner-zero-grad"),
                         weights_only=True)
    # official: never cleared, so the path step's Adam step follows the G step's gradient again
    assert all(g is not None and g.abs().sum() > 0 for g in summed["miner_grads"])
    assert all(g is not None and not g.any() for g in cleared["miner_grads"])  # cleared: only the path step's zeros
    assert not same(summed["miner"], cleared["miner"])
    # the running sums are part of the checkpoint: a resumed run continues them bit for bit
    a, b = straight_and_resumed(source, target, root / "mg-a", root / "mg-b", "minegan", *flags)
    for key in ("d", "miner", "input_miner"):
        assert same(a[key], b[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["miner_grads"], b["miner_grads"]))


def test_ada_kimg_100_lets_p_reach_0_2_in_5002_iterations_and_r_t_counts_the_r1_reals(setup):
    args = baselines.parse_args(["--baseline", "ada"])
    assert args.ada_kimg == 100  # ADA's train.py when starting from a pretrained network
    p = 0.0
    for i in range(5002):  # r_t always above the target: p rises at its fastest
        if (i + 1) % args.ada_interval == 0:
            p = baselines.ada_update_p(p, 1.0, args.ada_target, args.batch, args.ada_interval, args.ada_kimg)
    assert p == pytest.approx(1250 * 4 * 4 / 100_000)  # 0.2
    assert baselines.count_signs([1.0, 2], torch.tensor([[0.5], [-2.0], [3.0]])) == [2.0, 5]
    # iteration 0 is an R1 step: its reals count too (ADA's loss.py), unless --ada-rt-main-only
    root, source, target = setup
    both = torch.load(run(source, target, root / "ada-rt", "ada", "--iter", "1"), weights_only=True)
    main_only = torch.load(run(source, target, root / "ada-rt-main", "ada", "--iter", "1", "--ada-rt-main-only"), weights_only=True)
    assert both["ada_signs"][1] == 4 and main_only["ada_signs"][1] == 2  # batch 2: main step + R1 step


def test_ada_resume_is_bit_for_bit_and_p_adapts(setup):
    root, source, target = setup
    ada = ["--ada-p", "0.5", "--ada-interval", "1", "--ada-kimg", "0.01"]  # p moves by 0.2 per D step
    a, b = straight_and_resumed(source, target, root / "ada", root / "ada-resumed", "ada", *ada)
    for key in ("g", "g_ema", "d"):
        assert same(a[key], b[key]), key
    assert a["ada_p"] == b["ada_p"] and a["ada_p"] != 0.5
    assert open(root / "ada" / "log.csv").read() == open(root / "ada-resumed" / "log.csv").read()


def test_bsa_lr_decays_x0_2_every_3000_iterations_as_the_official_updater():
    # official: alpha *= 0.2 before the update of iteration i (0-based) whenever (i + 1) % 3000 == 0
    assert [baselines.bsa_lr_scale(i) for i in (0, 2998, 2999, 5998, 5999, 8999, 9999)] == pytest.approx(
        [1, 1, 0.2, 0.2, 0.04, 0.008, 0.008])


def test_bsa_trains_only_scale_shift_and_latents_and_resumes_bit_for_bit(setup):
    root, source, target = setup
    path = run(source, target, root / "bsa", "bsa", "--iter", "1", "--lpips-random-backbone")
    raw = torch.load(path, weights_only=True)
    src = torch.load(source, weights_only=False)
    assert same(raw["g_ema"], src["g_ema"]) and same(raw["g"], src["g_ema"]) and same(raw["d"], src["d"])
    assert any(not torch.equal(v, torch.ones_like(v) if ".gamma." in "." + k else torch.zeros_like(v)) for k, v in raw["scale_shift"].items())
    assert raw["bsa_latents"].shape == (5, 16) and set(raw["bsa_optim"]["state"]) == set(range(len(raw["scale_shift"]) + 1))
    assert sorted(p.name for p in (root / "bsa" / "samples").iterdir()) == ["000000.png", "000001.png", "recon_000000.png", "recon_000001.png"]
    # resume, without the perceptual term (no LPIPS to build)
    a, b = straight_and_resumed(source, target, root / "bsa-a", root / "bsa-b", "bsa", "--bsa-perceptual", "0")
    assert same(a["scale_shift"], b["scale_shift"]) and torch.equal(a["bsa_latents"], b["bsa_latents"])
    g = baselines.adapted_generator(root / "bsa-a" / "checkpoints" / "000002.pt")
    assert len(g.conv1.conv._forward_hooks) == 1


def test_demo_mode_and_default_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = baselines.parse_args(["--baseline", "ewc"])
    assert args.demo and args.iter == 1500 and args.batch == 4 and args.out == "runs/ewc-demo"
    args = baselines.parse_args(["--baseline", "bsa", "--iter", "7"])
    assert args.iter == 7 and args.batch == 25 and args.lr == 0.03 and args.bsa_latent_lr == 0.03 and args.out == "runs/bsa-demo"


def test_bad_input_one_line_errors(setup, tmp_path):
    root, source, target = setup
    # the baselines' own checks, in process
    for baseline, extra, message in [("freezed", ["--freeze-d", "4"], "3 blocks after FromRGB"),
                                     ("ada", ["--ada-exclude", "cutout"], "not in the bgc set"),
                                     ("ewc", ["--ewc-weight", "-1"], "--ewc-weight must be >= 0")]:
        with pytest.raises(baselines.UserError, match=message):
            run(source, target, tmp_path / "out", baseline, *extra, "--iter", "1")
    # the shared bad inputs, as the command line reports them: one line, exit status 2
    assert_cli_errors("baselines.py", standard_bad_inputs(tmp_path, source, target),
                      ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")])
