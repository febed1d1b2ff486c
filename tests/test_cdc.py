"""cdc.py: the distance-consistency loss against a direct double loop, and end-to-end tiny runs on CPU."""

import os

import numpy as np
import pytest
from conftest import assert_cli_errors, standard_bad_inputs
import torch
import torch.nn.functional as F
from PIL import Image

import cdc
from checkpoints import load_checkpoint



# ------------------------------------------------------------------------------------------------
# the loss


def loss_double_loop(feats_src, feats_tgt, layer_idx, direction="source_target", reduction="mean"):
    """The official computation: per row i, cosine similarities to every j != i, softmax, KLDivLoss."""
    n = len(layer_idx)
    p_src, p_tgt = [], []
    for feats, out in ((feats_src, p_src), (feats_tgt, p_tgt)):
        rows = []
        for i in range(n):
            layer = int(layer_idx[i])
            sims = [F.cosine_similarity(feats[layer][i].flatten(), feats[layer][j].flatten(), dim=0) for j in range(n) if j != i]
            rows.append(torch.softmax(torch.stack(sims), 0))
        out.append(torch.stack(rows))
    p_s, p_t = p_src[0], p_tgt[0]
    if direction == "source_target":
        kl = torch.nn.KLDivLoss(reduction="sum" if reduction != "mean" else "mean")(torch.log(p_t), p_s)
    else:
        kl = torch.nn.KLDivLoss(reduction="sum" if reduction != "mean" else "mean")(torch.log(p_s), p_t)
    return kl / n if reduction == "batchmean" else kl


def random_feats(n, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 4), (8, 8, 8), (4, 8, 8), (4, 16, 16)]
    return [torch.randn(n, *s, generator=g) for s in shapes]


@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
@pytest.mark.parametrize("direction", ["source_target", "target_source"])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("n", [3, 5])
def test_loss_equals_double_loop(direction, reduction, n):
    feats_src = random_feats(n, 1)
    feats_tgt = random_feats(n, 2)
    layer_idx = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
    ours = cdc.distance_consistency_loss(feats_src, feats_tgt, layer_idx, direction, reduction)
    expected = loss_double_loop(feats_src, feats_tgt, layer_idx, direction, reduction)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-7)
    assert ours.item() > 0


def test_official_mean_is_kldivloss_over_all_entries():
    feats_src, feats_tgt = random_feats(4, 3), random_feats(4, 4)
    layer_idx = torch.tensor([1, 1, 3, 0])
    mean = cdc.distance_consistency_loss(feats_src, feats_tgt, layer_idx)
    total = cdc.distance_consistency_loss(feats_src, feats_tgt, layer_idx, reduction="sum")
    assert torch.allclose(mean, total / 12)  # N (N - 1) = 12 entries


def test_loss_is_zero_for_identical_features_and_positive_otherwise():
    feats = random_feats(4, 5)
    layer_idx = torch.tensor([0, 1, 2, 3])
    assert cdc.distance_consistency_loss(feats, [f.clone() for f in feats], layer_idx).abs().item() < 1e-9
    # a positive rescaling keeps cosines, hence the loss is zero too
    assert cdc.distance_consistency_loss(feats, [3 * f for f in feats], layer_idx).abs().item() < 1e-7


def test_gradient_reaches_only_the_adapted_side():
    feats_src = [f.requires_grad_() for f in random_feats(4, 6)]
    feats_tgt = [f.requires_grad_() for f in random_feats(4, 7)]
    layer_idx = torch.tensor([2, 2, 1, 3])
    cdc.distance_consistency_loss(feats_src, feats_tgt, layer_idx).backward()
    assert all(f.grad is None for f in feats_src)
    assert feats_tgt[2].grad.abs().sum() > 0 and feats_tgt[1].grad.abs().sum() > 0
    assert feats_tgt[0].grad is None or feats_tgt[0].grad.abs().sum() == 0  # unused layer


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


def run_cdc(source, target, out, *extra):
    argv = ["--source", source, "--target", target, "--out", str(out), "--batch", "2", "--feat-const-batch", "3",
            "--n-sample", "4", "--device", "cpu", *extra]
    return cdc.main(argv)


def test_end_to_end_files_and_checkpoint(setup):
    root, source, target = setup
    out = root / "run"
    path = run_cdc(source, target, out, "--iter", "6", "--sample-every", "3", "--save-every", "4")
    assert sorted(os.listdir(out / "checkpoints")) == ["000004.pt", "000006.pt"]
    assert sorted(os.listdir(out / "samples")) == [
        "000000.png", "000003.png", "000006.png", "anchors_000000.png", "anchors_000003.png", "anchors_000006.png"
    ]
    grid = Image.open(out / "samples" / "000006.png")
    assert grid.size == (2 * (2 * 34 + 2) + 8, 2 * 34 + 2)  # two 2x2 grids of 32-px images and the gap
    rows = open(out / "log.csv").read().split()
    assert rows[0] == "iter,d,g,dist,r1,path,mean_path" and len(rows) == 7
    assert float(rows[2].split(",")[3]) > 0  # L_dist is active
    # the result is a rosinality checkpoint; the anchors (one per target image) are saved with it
    models, raw = load_checkpoint(path)
    assert set(models) == {"g", "g_ema", "d"} and raw["iter"] == 6
    assert raw["anchors"].shape == (5, 16) and set(raw["patch_head"]) >= {"new_conv.0.0.weight", "new_conv.0.1.bias"}
    source_g = load_checkpoint(source)[0]["g"]
    changed = [not torch.equal(a, b) for a, b in zip(source_g.state_dict().values(), models["g"].state_dict().values())]
    assert any(changed)


def test_resume_is_bit_for_bit(setup):
    root, source, target = setup
    straight = run_cdc(source, target, root / "straight", "--iter", "6", "--save-every", "100", "--sample-every", "100")
    run_cdc(source, target, root / "resumed", "--iter", "3", "--save-every", "100", "--sample-every", "100")
    resumed = run_cdc(source, target, root / "resumed", "--iter", "6", "--save-every", "100", "--sample-every", "100", "--resume")
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["mean_path_length"], b["mean_path_length"])
    assert open(root / "straight" / "log.csv").read() == open(root / "resumed" / "log.csv").read()


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-dist", "--adv", "image", "--cdc-export"],
        ["--adv", "patch", "--highp", "3", "--same-noise"],
        ["--kl-direction", "target_source", "--kl-reduction", "batchmean", "--kl-layers", "all", "--ignore-source-optim"],
    ],
)
def test_ablation_and_variant_flags(setup, flags):
    root, source, target = setup
    out = root / ("flags-" + "-".join(f.strip("-") for f in flags[:3]))
    run_cdc(source, target, out, "--iter", "2", *flags)
    rows = [r.split(",") for r in open(out / "log.csv").read().split()[1:]]
    dist = [float(r[3]) for r in rows]
    assert (max(dist) == 0) == ("--no-dist" in flags)
    if "--cdc-export" in flags:
        exported = torch.load(out / "g_ema_cdc_generate.pt", weights_only=True)["g_ema"]
        assert all(k.startswith("module.") for k in exported)
        assert load_checkpoint(str(out / "g_ema_cdc_generate.pt"), require=("g_ema",))[0]["g_ema"].size == 32


def test_bad_input_one_line_errors(setup, tmp_path):
    root, source, target = setup
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")]
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small / "a.png")
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    cases = standard_bad_inputs(tmp_path, source, target) + [
        (["--source", source, "--target", str(small)], "smaller than the generator's 32 px"),
        (["--source", str(not_torch), "--target", target], "not a PyTorch checkpoint"),
        (["--source", source, "--target", target, "--batch", "6"], "multiple of 4"),
        (["--source", source, "--target", target, "--resume"], "no checkpoint"),
    ]
    assert_cli_errors("cdc.py", cases, base)
