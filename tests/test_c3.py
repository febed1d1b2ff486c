"""c3.py: the contrastive correspondence loss against an explicit loop, and end-to-end tiny runs on CPU."""

import math
import os

import pytest
from conftest import assert_cli_errors, standard_bad_inputs
import torch
import torch.nn.functional as F
from PIL import Image

import c3
from common import UserError
from checkpoints import load_checkpoint



pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# the loss


def loss_explicit(feat_src, feat_tgt, tau):
    """Cross-entropy with target i over the matrix cos(src_i, tgt_j) / tau, built one entry at a time."""
    m = feat_src.shape[0]
    sim = torch.stack([
        torch.stack([F.cosine_similarity(feat_src[i], feat_tgt[j], dim=0) for j in range(m)]) for i in range(m)
    ])  # [M, M]
    return F.cross_entropy(sim / tau, torch.arange(m))


def random_pair(m, d, seed, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(m, d, generator=g)
    return src, src + noise * torch.randn(m, d, generator=g)  # the adapted side: the source features, perturbed


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
@pytest.mark.parametrize("m", [2, 4, 7])
def test_loss_equals_cross_entropy_over_cosine_matrix(m, tau):
    g = torch.Generator().manual_seed(m)
    feat_src, feat_tgt = torch.randn(m, 11, generator=g), torch.randn(m, 11, generator=g)
    ours = c3.contrastive_correspondence_loss(feat_src, feat_tgt, tau)
    expected = loss_explicit(feat_src, feat_tgt, tau)
    assert ours.shape == () and torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # and against the formula itself: - 1/M sum_i log( exp(s_ii) / sum_j exp(s_ij) )
    terms = []
    for i in range(m):
        s = [F.cosine_similarity(feat_src[i], feat_tgt[j], dim=0).item() / tau for j in range(m)]
        terms.append(-math.log(math.exp(s[i]) / sum(math.exp(v) for v in s)))
    assert abs(ours.item() - sum(terms) / m) < 1e-4 * max(1.0, abs(ours.item()))


def test_source_is_the_anchor_not_symmetric():
    feat_src, feat_tgt = random_pair(5, 8, 1, noise=1.0)
    forward = c3.contrastive_correspondence_loss(feat_src, feat_tgt, 0.1)
    assert torch.allclose(forward, loss_explicit(feat_src, feat_tgt, 0.1), rtol=1e-5)
    # rows are source anchors: swapping the roles gives the transposed matrix, a different loss
    assert not torch.allclose(forward, c3.contrastive_correspondence_loss(feat_tgt, feat_src, 0.1))


def test_matched_pairs_score_lower_than_shuffled_pairs():
    feat_src, feat_tgt = random_pair(6, 32, 2)
    matched = c3.contrastive_correspondence_loss(feat_src, feat_tgt, 0.07)
    shuffled = c3.contrastive_correspondence_loss(feat_src, feat_tgt[torch.tensor([1, 2, 3, 4, 5, 0])], 0.07)
    assert matched < 0.5 < math.log(6) < shuffled


def test_identical_orthonormal_features_give_the_closed_form():
    m, tau = 4, 0.2
    feats = torch.eye(m, 9)[:, torch.randperm(9)] * 3.0  # orthogonal rows, norm 3
    loss = c3.contrastive_correspondence_loss(feats, feats.clone(), tau)
    # cos = 1 on the diagonal, 0 elsewhere: -log(e^{1/tau} / (e^{1/tau} + (M - 1)))
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + m - 1))
    assert abs(loss.item() - expected) < 1e-5


def test_gradient_reaches_only_the_adapted_side():
    feat_src, feat_tgt = random_pair(4, 16, 3)
    feat_src.requires_grad_()
    feat_tgt.requires_grad_()
    c3.contrastive_correspondence_loss(feat_src, feat_tgt, 0.07).backward()
    assert feat_src.grad is None
    assert feat_tgt.grad is not None and feat_tgt.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


def run_c3(source, target, out, *extra):
    argv = ["--source", source, "--target", target, "--out", str(out), "--batch", "2", "--con-batch", "3",
            "--n-sample", "4", "--device", "cpu", *extra]
    return c3.main(argv)


def log_rows(out):
    rows = open(out / "log.csv").read().split()
    return rows[0].split(","), [[float(v) for v in r.split(",")] for r in rows[1:]]


def test_end_to_end_files_and_checkpoint(setup):
    root, source, target = setup
    out = root / "run"
    path = run_c3(source, target, out, "--iter", "6", "--sample-every", "3", "--save-every", "4")
    assert sorted(os.listdir(out / "checkpoints")) == ["000004.pt", "000006.pt"]
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000003.png", "000006.png"]  # no anchor grids
    grid = Image.open(out / "samples" / "000006.png")
    assert grid.size == (2 * (2 * 34 + 2) + 8, 2 * 34 + 2)  # two 2x2 grids of 32-px images and the gap
    columns, rows = log_rows(out)
    assert columns == ["iter", "d", "g", "con", "r1", "path", "mean_path"] and len(rows) == 6
    # L_con is active: InfoNCE over M = 3 starts near its value for a perfect match, above 0
    assert all(r[3] > 0 and math.isfinite(r[3]) for r in rows)
    assert rows[0][4] > 0 and rows[1][4] == 0  # lazy R1 on iteration 0 only (every 16)
    models, raw = load_checkpoint(path)
    assert set(models) == {"g", "g_ema", "d"} and raw["iter"] == 6
    assert "anchors" not in raw and set(raw["patch_head"]) >= {"new_conv.0.0.weight", "new_conv.0.1.bias"}
    assert raw["args"]["tau"] == 0.07 and raw["args"]["encoder"] == "generator"
    source_g = load_checkpoint(source)[0]["g"]
    changed = [not torch.equal(a, b) for a, b in zip(source_g.state_dict().values(), models["g"].state_dict().values())]
    assert any(changed)


def test_resume_is_bit_for_bit(setup):
    root, source, target = setup
    straight = run_c3(source, target, root / "straight", "--iter", "6", "--save-every", "100", "--sample-every", "100")
    run_c3(source, target, root / "resumed", "--iter", "3", "--save-every", "100", "--sample-every", "100")
    resumed = run_c3(source, target, root / "resumed", "--iter", "6", "--save-every", "100", "--sample-every", "100", "--resume")
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
        ["--encoder", "discriminator", "--same-noise"],
        ["--encoder", "discriminator", "--d-pool", "mean", "--highp", "3", "--ignore-source-optim"],
        ["--no-con", "--cdc-export"],
    ],
)
def test_encoder_and_ablation_flags(setup, flags):
    root, source, target = setup
    out = root / ("flags-" + "-".join(f.strip("-") for f in flags))
    run_c3(source, target, out, "--iter", "2", "--tau", "0.5", *flags)
    _, rows = log_rows(out)
    con = [r[3] for r in rows]
    if "--no-con" in flags:
        assert max(con) == 0
        exported = torch.load(out / "g_ema_cdc_generate.pt", weights_only=True)["g_ema"]
        assert all(k.startswith("module.") for k in exported)
    else:
        assert min(con) > 0 and all(math.isfinite(c) for c in con)
    if "--same-noise" in flags:
        # iteration 0: G_t = G_s and one noise draw, so f(G_s(z_i)) = f(G_t(z_i)): the positives win every row
        assert con[0] < math.log(3)


def test_bad_input_one_line_errors(setup, tmp_path):
    root, source, target = setup
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")]
    cases = standard_bad_inputs(tmp_path, source, target)
    assert_cli_errors("c3.py", cases, base)


@pytest.mark.parametrize(
    "flags, message",
    [(["--con-batch", "1"], "--con-batch must be at least 2"), (["--tau", "0"], "--tau must be positive"),
     (["--highp", "5"], "--highp in 1..4"), (["--batch", "6"], "multiple of 4")],
)
def test_bad_hyperparameters_are_user_errors(flags, message):
    with pytest.raises(UserError, match=message):
        c3.parse_args(["--source", "s.pt", "--target", "t", *flags])
