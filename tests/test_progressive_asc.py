"""progressive_asc.py: the spec's sanity checks (EMA, flow direction, batched roi_align against a per-point loop,
window schedule, pair count, KL reduction, zero loss, masked sampling) and end-to-end tiny runs on CPU."""

import os

import numpy as np
import pytest
from conftest import assert_cli_errors, standard_bad_inputs
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import common
import progressive_asc as pasc
from checkpoints import load_checkpoint
from stylegan2 import Generator



# ------------------------------------------------------------------------------------------------
# the progressive reference G_{n-alpha}


def test_ema_constant_and_decay():
    assert abs(common.EMA_DECAY - 0.99778439) < 1e-8
    torch.manual_seed(0)
    g = Generator(8, style_dim=4, n_mlp=1, channel_cap=4)
    g_ema = Generator(8, style_dim=4, n_mlp=1, channel_cap=4)
    before = {k: v.clone() - dict(g.named_parameters())[k].detach() for k, v in g_ema.named_parameters()}
    k = 7
    for _ in range(k):
        common.accumulate(g_ema, g, common.EMA_DECAY)
    for name, param in g_ema.named_parameters():
        gap = param.detach() - dict(g.named_parameters())[name].detach()
        assert torch.allclose(gap, before[name] * common.EMA_DECAY**k, atol=1e-6), name


# ------------------------------------------------------------------------------------------------
# flow, window schedule, edge map


def smooth_texture(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size // 4, size // 4, generator=g)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)[0]  # [3, H, W]


def test_farneback_direction_on_shifted_image():
    ref = smooth_texture()
    cur = torch.roll(ref, shifts=(-2, 3), dims=(1, 2))  # cur(y, x) = ref(y + 2, x - 3): ref(y, x) = cur(y - 2, x + 3)
    flow = pasc.farneback_flow(ref[None], cur[None], 16)  # [1, 2, H, W]
    assert flow.shape == (1, 2, 64, 64) and flow.dtype == torch.float32
    inner = flow[0, :, 12:-12, 12:-12].flatten(1)
    assert abs(inner[0].median().item() - 3) < 0.25 and abs(inner[1].median().item() + 2) < 0.25
    # the thread-pool path gives the same flow
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        pooled = pasc.farneback_flow(torch.stack([ref, cur]), torch.stack([cur, ref]), 16, pool=pool)
    assert torch.equal(pooled[:1], flow)


def test_winsize_schedule():
    def official(n):  # `if winsize < 32: winsize *= inc` once per iteration, before the flow
        w, out = 16.0, []
        for _ in range(n):
            if w < 32:
                w *= 1.0002
            out.append(w)
        return out

    ref = official(5002)
    for i in (0, 1, 302, 303, 1000, 3465, 3466, 3467, 5001):
        assert pasc.farneback_winsize(i) == ref[i], i
    assert int(pasc.farneback_winsize(302)) == 16 and int(pasc.farneback_winsize(303)) == 17
    assert int(pasc.farneback_winsize(3465)) == 31 and int(pasc.farneback_winsize(3466)) == 32
    assert pasc.farneback_winsize(3466) == pasc.farneback_winsize(5001)  # constant once at 32


def test_edge_map_values():
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)  # gray ramp along x
    slope = 2 / 31
    edges = pasc.edge_map(ramp, blur=0)
    # twice the standard Sobel: |G_x * I| = 2 * 8 * slope in the interior (gray = 0.9999 * value)
    assert torch.allclose(edges[0, 0, 1:-1, 1:-1], torch.full((30, 30), 16 * slope * 0.9999), rtol=1e-4)
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert edges.shape == (1, 1, 32, 32)
    assert pasc.edge_map(flat, blur=0, padding="replicate").abs().max() < 1e-6
    zeros_pad = pasc.edge_map(flat, blur=0)
    assert zeros_pad[0, 0, 8, 8] < 1e-6 and zeros_pad[0, 0, 0, 8] > 1  # zero padding: spurious border edges
    assert pasc.edge_map(flat, blur=7)[0, 0, 2, 8] > 0.1  # the blur spreads them inwards


# ------------------------------------------------------------------------------------------------
# sampling and reading the features


def test_masked_positions_have_zero_probability():
    torch.manual_seed(1)
    b, size, s = 2, 32, 8
    edges = torch.rand(b, 1, size, size) + 0.1
    flow = torch.zeros(b, 2, size, size)
    flow[0, 0, :8, :8] = 5.0  # a moving 8x8 block of sample 0 -> the 2x2 feature block at (0, 0)
    flow[1, 1, 16:, 16:] = -4.0
    cut = pasc.flow_cutoff(flow, 0.6)
    assert cut.item() == 0  # most pixels do not move
    flow_s = F.adaptive_avg_pool2d(flow, s) * (s / size)
    weights = pasc.sampling_distribution(edges, s, flow_s, cut, s / size)  # [B, s^2]
    moved = (flow_s[:, 0].abs() + flow_s[:, 1].abs()).flatten(1) > 0
    assert moved.sum() == 4 + 16
    assert (weights[moved] == 0).all() and (weights[~moved] >= 0).all()
    assert torch.allclose(weights.amax(1), torch.ones(b))  # min-max normalised
    draws = torch.multinomial(weights, 5000, replacement=True)
    assert not moved.gather(1, draws).any()
    # without the mask: the raw block means, no weight 0; an all-zero map falls back to uniform (official: a crash)
    free = pasc.sampling_distribution(edges, s)
    assert torch.equal(free, F.adaptive_avg_pool2d(edges, s).flatten(1)) and (free > 0).all()
    assert torch.equal(pasc.sampling_distribution(torch.zeros(b, 1, size, size), s), torch.ones(b, s * s))
    # with the mask a constant map falls back to uniform (official: NaN)
    constant = pasc.sampling_distribution(torch.ones(b, 1, size, size), s, torch.zeros(b, 2, s, s), cut, s / size)
    assert torch.equal(constant, torch.ones(b, s * s))


def test_sampling_map_min_max_normalised_only_with_flow_and_cutoff(monkeypatch):
    # official train.py: pred is min-max normalised only under use_flow and use_flow_pred; the --no-flow and
    # --no-cutoff ablations draw p from the raw pooled map, where the lowest-edge position keeps p > 0
    edges = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    feats = [torch.randn(1, 3, 2, 2)]
    seen = {}
    multinomial = torch.multinomial

    def spy(weights, *args, **kwargs):
        seen[mode] = weights / weights.sum(1, keepdim=True)  # the probabilities p is drawn with
        return multinomial(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    runs = {"default": (torch.zeros(1, 2, 4, 4), True), "no_cutoff": (torch.zeros(1, 2, 4, 4), False), "no_flow": (None, True)}
    for mode, (flow, use_cutoff) in runs.items():
        pasc.asc_similarities(feats, feats, edges, flow, [0], 4, use_cutoff=use_cutoff)
    assert torch.allclose(seen["default"], torch.tensor([[0.0, 1.0, 2.0, 3.0]]) / 6)  # (pm - 1) / 3, normalised
    for mode in ("no_cutoff", "no_flow"):
        assert torch.allclose(seen[mode], torch.tensor([[1.0, 2.0, 3.0, 4.0]]) / 10), mode  # pm itself
    assert seen["default"][0, 0] == 0 and seen["no_flow"][0, 0] > 0 and seen["no_cutoff"][0, 0] > 0


def per_point_loop(feat, idx, flow_s):
    """The official get_matched_values: one RoIAlign call per sampled point, boxes from float32 scalars."""
    b, c, s, _ = feat.shape
    out = torch.empty(b, c, idx.shape[1])
    for n in range(b):
        for k in range(idx.shape[1]):
            x, y = int(idx[n, k]) % s, int(idx[n, k]) // s
            xa = torch.tensor(x, dtype=torch.float32) + flow_s[n, 0, y, x]
            ya = torch.tensor(y, dtype=torch.float32) + flow_s[n, 1, y, x]
            box = torch.stack([xa - 0.5, ya - 0.5, xa + 0.5, ya + 0.5]).view(1, 4)
            out[n, :, k] = roi_align(feat[n : n + 1], [box], output_size=1, spatial_scale=1, sampling_ratio=-1).view(c)
    return out


def bilinear(feat, x, y):
    """Plain bilinear read of feat [C, s, s] at (x, y), clamping the corners (inside [-1, s])."""
    s = feat.shape[-1]
    x, y = min(max(x, 0.0), s - 1.0), min(max(y, 0.0), s - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, s - 1), min(y0 + 1, s - 1)
    ax, ay = x - x0, y - y0
    return ((1 - ay) * ((1 - ax) * feat[:, y0, x0] + ax * feat[:, y0, x1])
            + ay * ((1 - ax) * feat[:, y1, x0] + ax * feat[:, y1, x1]))


def test_batched_roi_align_equals_per_point_loop():
    g = torch.Generator().manual_seed(3)
    b, c, s, k = 3, 5, 8, 40
    feat = torch.randn(b, c, s, s, generator=g, requires_grad=True)
    flow_s = torch.randn(b, 2, s, s, generator=g) * 2.5  # some points leave the map
    idx = torch.randint(0, s * s, (b, k), generator=g)
    ours = pasc.warped_points(feat, idx, flow_s)
    assert ours.shape == (b, c, k)
    assert torch.equal(ours.detach(), per_point_loop(feat.detach(), idx, flow_s))
    # = bilinear at the displaced point wherever the float32 box is exactly 1 wide (not the 2-sample quirk)
    grid = pasc.warped_points(feat, idx, flow_s, sampler="grid_sample").detach()
    checked = 0
    for n in range(b):
        for j in range(k):
            x, y = int(idx[n, j]) % s, int(idx[n, j]) // s
            xa = torch.tensor(x, dtype=torch.float32) + flow_s[n, 0, y, x]
            ya = torch.tensor(y, dtype=torch.float32) + flow_s[n, 1, y, x]
            inside = -1 <= xa <= s and -1 <= ya <= s
            expected = bilinear(feat[n].detach(), xa.item(), ya.item()) if inside else torch.zeros(c)
            assert torch.allclose(grid[n, :, j], expected, atol=1e-5)
            if ((xa + 0.5) - (xa - 0.5)) == 1 and ((ya + 0.5) - (ya - 0.5)) == 1:
                assert torch.allclose(ours[n, :, j].detach(), expected, atol=1e-5)
                checked += 1
    assert checked > k  # most points
    ours.sum().backward()
    assert feat.grad.abs().sum() > 0
    # no flow displacement: exactly the features at the integer positions
    assert torch.equal(pasc.warped_points(feat, idx, torch.zeros_like(flow_s)), pasc.gather_points(feat, idx))


def feats_for(size, channels, b, seed):
    g = torch.Generator().manual_seed(seed)
    gen = Generator(size, style_dim=4, n_mlp=1, channel_cap=channels)
    res = [4] + [2 ** (2 + (k + 1) // 2) for k in range(1, gen.num_layers)]
    return gen, [torch.randn(b, channels, r, r, generator=g) for r in res]


def test_pair_count_per_sample_at_256():
    gen, feats_ref = feats_for(256, 2, 2, 4)
    _, feats_cur = feats_for(256, 2, 2, 5)
    layers = pasc.default_asc_layers(gen)
    assert layers == list(range(1, 11)) == pasc.default_asc_layers(gen, "to-half")  # the official --LFC_layers
    edges = torch.rand(2, 1, 256, 256)
    flow = torch.randn(2, 2, 256, 256)
    s_ref, s_cur, sizes = pasc.asc_similarities(feats_ref, feats_cur, edges, flow, layers, 256)
    assert sizes == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]  # M_l = 2 s_l
    assert s_ref.shape == s_cur.shape == (2, 992)
    assert s_ref.abs().max() <= 1 + 1e-6


def test_asc_layer_lists_by_size():
    # num_layers = 2 log2(size) - 3 styled convs (feature 0 at 4^2, then two per resolution)
    assert Generator(32, style_dim=4, n_mlp=1, channel_cap=2).num_layers == 2 * 5 - 3
    official, to_half = {}, {}
    for size in (32, 256, 512, 1024):
        num_layers = 2 * int(np.log2(size)) - 3
        official[size], to_half[size] = pasc.asc_layer_list(num_layers), pasc.asc_layer_list(num_layers, "to-half")
    # official --LFC_layers: 1..10 at every size, capped at the last layer of a 32 px generator (its 32^2 convs)
    assert official == {32: list(range(1, 7)), 256: list(range(1, 11)), 512: list(range(1, 11)), 1024: list(range(1, 11))}
    # to-half: 8^2 .. size/2, equal to the official list only at 256 px
    assert to_half == {32: list(range(1, 5)), 256: list(range(1, 11)), 512: list(range(1, 13)), 1024: list(range(1, 15))}
    args = pasc.parse_args(["--source", "s", "--target", "t"])
    assert args.asc_layers == "official"


# ------------------------------------------------------------------------------------------------
# the losses


@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
def test_kl_reduction_is_official_mean():
    g = torch.Generator().manual_seed(6)
    sim_ref, sim_cur = torch.rand(4, 992, generator=g) * 2 - 1, torch.rand(4, 992, generator=g) * 2 - 1
    p_ref, p_cur = sim_ref.softmax(1), sim_cur.softmax(1)
    expected = (p_ref * (p_ref.log() - p_cur.log())).sum() / (4 * 992)
    loss = pasc.asc_kl(sim_ref, sim_cur)
    assert torch.allclose(loss, expected, rtol=1e-4)
    official = torch.nn.KLDivLoss(reduction="mean")(F.log_softmax(sim_cur, 1), p_ref)
    assert torch.allclose(loss, official, rtol=1e-4) and loss > 0
    # lambda_prog * lambda_asc with the defaults: 1000 * 400 * 0.5 = 2e5
    args = pasc.parse_args(["--source", "s", "--target", "t"])
    assert args.kl_wt * pasc.ASC_WEIGHT_FACTOR * args.lfcw == 2e5
    assert (args.cutoff, args.blur, args.winsize, args.winsize_inc, args.feat_const_batch) == (0.6, 7, 16, 1.0002, 4)
    # per-layer softmax (paper reading): the KL of each block, still / (B * 992)
    sizes = [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    blocks = [(r.softmax(1), c.softmax(1)) for r, c in zip(sim_ref.split(sizes, 1), sim_cur.split(sizes, 1))]
    expected_layer = sum((r * (r.log() - c.log())).sum() for r, c in blocks) / (4 * 992)
    assert torch.allclose(pasc.asc_kl(sim_ref, sim_cur, sizes), expected_layer, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
def test_kl_precision_against_float64():
    # near-equal similarities, as when G_n is close to G_{n-alpha}: float32 log-probabilities near -log 992
    # lose ~5e-7 each against a KL of ~5e-5 per sample
    g = torch.Generator().manual_seed(9)
    sim_ref = torch.rand(4, 992, generator=g) * 2 - 1
    sim_cur = (sim_ref + 0.01 * torch.randn(4, 992, generator=g)).requires_grad_()
    p_ref, p_cur = sim_ref.double().softmax(1), sim_cur.detach().double().softmax(1)
    exact = (p_ref * (p_ref.log() - p_cur.log())).mean()
    loss = pasc.asc_kl(sim_ref, sim_cur)
    loss.backward()
    assert loss.dtype == sim_cur.grad.dtype == torch.float32
    ours = abs(loss.item() / exact.item() - 1)
    official = torch.nn.KLDivLoss(reduction="mean")(torch.log(F.softmax(sim_cur.detach(), 1)), F.softmax(sim_ref, 1))
    assert ours < 1e-7 < abs(official.item() / exact.item() - 1)
    # the gradient: d/dS_cur = (phi_cur - phi_ref) / (B n)
    assert torch.allclose(sim_cur.grad.double(), (p_cur - p_ref) / (4 * 992), rtol=1e-6, atol=1e-14)


def test_zero_loss_for_identical_inputs_and_gradient_only_on_current():
    _, feats = feats_for(32, 4, 3, 7)
    edges, flow = torch.rand(3, 1, 32, 32), torch.zeros(3, 2, 32, 32)
    layers = [1, 2, 3, 4]
    s_ref, s_cur, sizes = pasc.asc_similarities(feats, [f.clone() for f in feats], edges, flow, layers, 32)
    assert torch.equal(s_ref, s_cur) and sizes == [16, 16, 32, 32]
    assert pasc.asc_kl(s_ref, s_cur).abs().item() == 0
    # IDC (CDC's loss against the reference): zero for identical features
    layer_idx = torch.tensor([1, 2, 4])
    assert pasc.distance_consistency_loss(feats, [f.clone() for f in feats], layer_idx).abs().item() < 1e-9
    # a different current generator: positive, gradients only on the current side
    ref = [f.clone().requires_grad_() for f in feats]
    _, other = feats_for(32, 4, 3, 8)
    cur = [f.requires_grad_() for f in other]
    flow = torch.randn(3, 2, 32, 32)
    loss = pasc.asc_kl(*pasc.asc_similarities(ref, cur, edges, flow, layers, 32)[:2])
    loss.backward()
    assert loss.item() > 0
    assert all(f.grad is None for f in ref)
    assert all(cur[layer].grad.abs().sum() > 0 for layer in layers) and cur[5].grad is None


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


def run_asc(source, target, out, *extra):
    argv = ["--source", source, "--target", target, "--out", str(out), "--batch", "2", "--feat-const-batch", "3",
            "--n-sample", "4", "--device", "cpu", *extra]
    return pasc.main(argv)


def log_rows(out):
    rows = open(out / "log.csv").read().split()
    return rows[0].split(","), [[float(v) for v in r.split(",")] for r in rows[1:]]


def test_end_to_end_files_and_checkpoint(setup):
    root, source, target = setup
    out = root / "run"
    path = run_asc(source, target, out, "--iter", "5", "--sample-every", "3", "--save-every", "4")
    assert sorted(os.listdir(out / "checkpoints")) == ["000004.pt", "000005.pt"]
    assert sorted(os.listdir(out / "samples")) == [
        "000000.png", "000003.png", "000005.png", "anchors_000000.png", "anchors_000003.png", "anchors_000005.png"
    ]
    header, rows = log_rows(out)
    assert header == ["iter", "d", "g", "idc", "asc", "r1", "path", "mean_path"] and len(rows) == 5
    assert all(r[3] > 0 and r[4] > 0 for r in rows)  # L_idc and L_asc active
    models, raw = load_checkpoint(path)
    assert set(models) == {"g", "g_ema", "d"} and raw["iter"] == 5
    assert raw["anchors"].shape == (5, 16)  # 5 target images > 4: one anchor each
    assert raw["args"]["cutoff"] == 0.6 and raw["args"]["lfcw"] == 0.5
    # g_ema moved from the source's g_ema by the EMA (G_{n-alpha} follows G_n)
    source_models = load_checkpoint(source)[0]
    moved = [not torch.equal(a, b) for a, b in zip(source_models["g_ema"].parameters(), models["g_ema"].parameters())]
    assert any(moved)


def test_resume_is_bit_for_bit(setup):
    root, source, target = setup
    straight = run_asc(source, target, root / "straight", "--iter", "5", "--save-every", "100", "--sample-every", "100")
    run_asc(source, target, root / "resumed", "--iter", "3", "--save-every", "100", "--sample-every", "100")
    resumed = run_asc(source, target, root / "resumed", "--iter", "5", "--save-every", "100", "--sample-every", "100", "--resume")
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert open(root / "straight" / "log.csv").read() == open(root / "resumed" / "log.csv").read()


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-asc", "--idc-ref", "source"],
        ["--no-idc", "--no-flow", "--no-pred", "--asc-layers", "to-half"],
        ["--asc-softmax", "per_layer", "--flow-magnitude", "l2", "--sobel-padding", "replicate", "--flow-gray", "rgb",
         "--asc-sampler", "grid_sample", "--asc-ref", "source", "--asc-layers", "1,3,5", "--no-cutoff"],
    ],
)
def test_ablation_and_variant_flags(setup, flags):
    root, source, target = setup
    out = root / ("flags-" + "-".join(f.strip("-") for f in flags[:3]))
    run_asc(source, target, out, "--iter", "2", "--sample-every", "100", *flags)
    _, rows = log_rows(out)
    assert (max(r[4] for r in rows) == 0) == ("--no-asc" in flags)
    assert (max(r[3] for r in rows) == 0) == ("--no-idc" in flags)


def test_shared_latents_save_two_generator_forwards_per_iteration(setup, monkeypatch):
    import stylegan2

    root, source, target = setup
    calls = []
    forward = stylegan2.Generator.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(kwargs.get("return_feats", False))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(stylegan2.Generator, "forward", counting_forward)
    counts = {}
    for mode in ("fresh", "shared"):
        calls.clear()
        out = root / f"latents-{mode}"
        run_asc(source, target, out, "--iter", "3", "--sample-every", "100", "--save-every", "100", "--asc-latents", mode)
        counts[mode] = (len(calls), sum(calls))
        _, rows = log_rows(out)
        assert all(r[3] > 0 and r[4] > 0 for r in rows)  # L_idc and L_asc both active
    # per iteration: the official sampling runs G_n and G_{n-alpha} on the ASC batch and again on the IDC batch
    assert counts["fresh"][0] - counts["shared"][0] == 2 * 3
    assert counts["fresh"][1] == 4 * 3 and counts["shared"][1] == 2 * 3
    with pytest.raises(common.UserError, match="--asc-latents shared needs"):
        pasc.parse_args(["--source", "s", "--target", "t", "--asc-latents", "shared", "--no-idc"])


def test_bad_input_one_line_errors(setup, tmp_path):
    root, source, target = setup
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")]
    cases = standard_bad_inputs(tmp_path, source, target)
    assert_cli_errors("progressive_asc.py", cases, base)
    with pytest.raises(common.UserError, match="--asc-layers"):
        pasc.main(["--source", source, "--target", target, "--asc-layers", "1,99", *base])
    with pytest.raises(common.UserError, match="official or to-half or comma-separated"):
        pasc.main(["--source", source, "--target", target, "--asc-layers", "half", *base])
