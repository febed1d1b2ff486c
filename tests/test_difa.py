"""difa.py: the losses and mask as pure functions, the CLIP tower and e4e loaders on state dicts in the official
key layouts (tiny random configurations), and end-to-end tiny runs on CPU."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import runtime
import difa
import nada
import pretrained
from conftest import assert_cli_errors
from checkpoints import load_checkpoint

TINY_CLIP = dict(width=32, layers=2, patch=8, resolution=32, out_dim=12)
TINY_E4E = dict(widths=(4, 8, 12, 16), units=(1, 2, 2, 1), style_dim=16, n_styles=8, size=32, se_reduction=4)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# tiny weight files in the official layouts


class _ClipArchive(torch.nn.Module):
    """What OpenAI's TorchScript archive holds at the top level: a `visual` tower plus text parts."""

    def __init__(self, tower):
        super().__init__()
        self.visual = tower
        self.token_embedding = torch.nn.Embedding(5, 4)

    def forward(self, x):
        return self.visual(x)[0]


def write_clip_state_dict(path, seed, jit=False, **config):
    torch.manual_seed(seed)
    tower = pretrained.VisionTower(**{**TINY_CLIP, **config})
    if jit:
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # deprecation notices
        traced = torch.jit.trace(_ClipArchive(tower).eval(), torch.randn(1, 3, tower.resolution, tower.resolution))
        torch.jit.save(traced, str(path))
    else:
        state = {"visual." + k: v for k, v in tower.state_dict().items()}
        state.update({"token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.ones(())})
        torch.save(state, path)
    return str(path), tower


def write_e4e(path, seed=0, n_styles=8, **config):
    torch.manual_seed(seed)
    encoder = pretrained.E4E(**{**TINY_E4E, "n_styles": n_styles, **config})
    for m in encoder.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {"encoder." + k: v for k, v in encoder.state_dict().items() if k != "latent_avg"}
    state["decoder.style.1.weight"] = torch.zeros(3)  # the e4e file also carries the generator
    latent_avg = torch.randn(n_styles, encoder.latent_avg.shape[1]) * 0.1
    torch.save({"state_dict": state, "latent_avg": latent_avg,
                "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 1024}}, path)
    encoder.latent_avg.copy_(latent_avg)
    return str(path), encoder


@pytest.fixture(scope="module")
def weights(setup):
    root = setup[0]
    clip32, _ = write_clip_state_dict(root / "clip_a.pt", 1, jit=True)
    clip16, _ = write_clip_state_dict(root / "clip_b.pt", 2, patch=4, layers=4)
    e4e, _ = write_e4e(root / "e4e.pt")
    # the tiny source with non-zero noise strengths, as a trained generator has (zero: G_B(w) = G_A(w) at step 0)
    ckpt = torch.load(setup[1], weights_only=False)
    for name in ckpt["g_ema"]:
        if name.endswith("noise.weight"):
            ckpt["g_ema"][name] = torch.full_like(ckpt["g_ema"][name], 0.1)
    torch.save({"g_ema": ckpt["g_ema"]}, root / "source_g_ema.pt")
    reference = root / "reference.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 36, 4), dtype=np.uint8), "RGBA").save(reference)
    return {"clip": f"{clip32},{clip16}", "e4e": e4e, "reference": str(reference), "source": str(root / "source_g_ema.pt")}


# ------------------------------------------------------------------------------------------------
# networks and weight loading


def test_clip_tower_shapes_and_official_layout():
    tower = pretrained.VisionTower(width=64, layers=4, patch=8, resolution=32, out_dim=16)
    emb, tokens = tower(torch.randn(3, 3, 32, 32), return_layers=(1, 3))
    assert emb.shape == (3, 16) and set(tokens) == {1, 3}
    assert tokens[3].shape == (3, 16, 64)  # N = (32 / 8)^2, CLS excluded
    keys = set(tower.state_dict())
    assert {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.bias", "proj",
            "transformer.resblocks.3.attn.in_proj_weight", "transformer.resblocks.3.attn.in_proj_bias",
            "transformer.resblocks.3.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.ln_2.bias"} <= keys
    # real ViT-B/32 and B/16 shapes (meta device: no memory): 49 / 196 tokens of width 768, 512-d embedding
    for patch, n in ((32, 49), (16, 196)):
        with torch.device("meta"):
            real = pretrained.VisionTower(patch=patch)
            emb, tokens = real(torch.empty(2, 3, 224, 224), return_layers=(3,))
        assert emb.shape == (2, 512) and tokens[3].shape == (2, n, 768)
        assert real.state_dict()["positional_embedding"].shape == (n + 1, 768)
        assert real.transformer.resblocks[0].attn.heads == 12


def test_attention_matches_torch_multihead_attention():
    tower = pretrained.VisionTower(width=64, layers=1, patch=8, resolution=16, out_dim=8)
    attn = tower.transformer.resblocks[0].attn
    ref = torch.nn.MultiheadAttention(64, 1, batch_first=True)
    assert attn.heads == 1
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 64)
    assert torch.allclose(attn(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


def test_tower_matches_sequence_first_reference():
    """The whole tower against a direct sequence-first forward built from torch's own modules on the same
    visual.* state dict (the computation OpenAI's VisionTransformer runs), embedding and block tokens."""
    tower = pretrained.VisionTower(width=64, layers=3, patch=8, resolution=32, out_dim=10).eval()
    sd = tower.state_dict()
    x = torch.randn(2, 3, 32, 32)

    def ln(t, name):
        return F.layer_norm(t, (64,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    h = F.conv2d(x, sd["conv1.weight"], stride=8).reshape(2, 64, -1).permute(0, 2, 1)  # [B, 16, W]
    h = torch.cat([sd["class_embedding"] + torch.zeros(2, 1, 64), h], 1) + sd["positional_embedding"]
    h = ln(h, "ln_pre").permute(1, 0, 2)  # [L, B, W], sequence-first
    blocks = []
    for k in range(3):
        p = f"transformer.resblocks.{k}."
        mha = torch.nn.MultiheadAttention(64, 1)
        mha.load_state_dict({n[len(p) + 5:]: v for n, v in sd.items() if n.startswith(p + "attn.")})
        a = ln(h, p + "ln_1")
        h = h + mha(a, a, a, need_weights=False)[0]
        m = F.linear(ln(h, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h + F.linear(m * torch.sigmoid(1.702 * m), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        blocks.append(h.permute(1, 0, 2)[:, 1:])
    emb = ln(h[0], "ln_post") @ sd["proj"]
    ours, tokens = tower(x, return_layers=(0, 2))
    assert torch.allclose(ours, emb, atol=1e-5)
    assert torch.allclose(tokens[0], blocks[0], atol=1e-5) and torch.allclose(tokens[2], blocks[2], atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_clip_round_trip(tmp_path, jit):
    path, tower = write_clip_state_dict(tmp_path / "clip.pt", 4, jit=jit, layers=3)
    loaded = pretrained.load_vision_tower(path)
    assert pretrained.vision_config({k: v for k, v in tower.state_dict().items()}) == {**TINY_CLIP, "layers": 3}
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    (e1, t1), (e2, t2) = tower.eval()(x, return_layers=(2,)), loaded(x, return_layers=(2,))
    assert torch.equal(e1, e2) and torch.equal(t1[2], t2[2])


def test_e4e_shapes_round_trip_and_bn_modes(tmp_path):
    path, encoder = write_e4e(tmp_path / "e4e.pt")
    assert encoder.taps == [0, 2, 4, 5]  # stage ends (IR-SE50: 2, 6, 20, 23)
    keys = set(encoder.state_dict())
    assert {"input_layer.0.weight", "input_layer.1.running_var", "input_layer.2.weight", "body.0.res_layer.5.fc1.weight",
            "body.1.shortcut_layer.0.weight", "body.1.shortcut_layer.1.bias", "styles.7.convs.4.weight",
            "styles.0.linear.weight", "latlayer1.bias", "latlayer2.weight"} <= keys
    assert "body.0.shortcut_layer.0.weight" not in keys  # equal widths: subsampling shortcut, no parameters
    loaded = pretrained.load_e4e(path)
    assert pretrained.e4e_config({k: v for k, v in encoder.state_dict().items() if k != "latent_avg"}) == TINY_E4E
    x = torch.randn(2, 3, 32, 32)
    codes = loaded(x)
    assert codes.shape == (2, 8, 16)
    assert torch.equal(codes, encoder.eval()(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # batch statistics (release behaviour): different codes, running stats move
    before = loaded.input_layer[1].running_mean.clone()
    assert not torch.allclose(loaded.train()(x), codes)
    assert not torch.equal(before, loaded.input_layer[1].running_mean)
    # real layout: IR-SE50 body taps at 6, 20, 23; 18 heads over 16^2 / 32^2 / 64^2
    with torch.device("meta"):
        real = pretrained.E4E()
    assert real.taps[1:] == [6, 20, 23] and len(real.body) == 24 and len(real.styles) == 18
    assert len(real.styles[0].convs) == 8 and len(real.styles[3].convs) == 10 and len(real.styles[17].convs) == 12
    assert pretrained.e4e_config(real.state_dict()) == dict(widths=(64, 128, 256, 512), units=(3, 4, 14, 3), style_dim=512,
                                                      n_styles=18, size=256, se_reduction=16)


def test_e4e_head_routing_against_explicit_fpn(tmp_path):
    _, encoder = write_e4e(tmp_path / "e4e.pt")
    encoder.eval()
    x = torch.randn(1, 3, 32, 32)
    h = encoder.input_layer(x)
    feats = []
    for unit in encoder.body:
        h = unit(h)
        feats.append(h)
    c1, c2, c3 = feats[2], feats[4], feats[5]
    p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + encoder.latlayer1(c2)
    p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + encoder.latlayer2(c1)
    w0 = encoder.styles[0](c3)
    expected = [w0] + [w0 + encoder.styles[i](c3 if i < 3 else p2 if i < 7 else p1) for i in range(1, 8)]
    expected = torch.stack(expected, 1) + encoder.latent_avg
    assert torch.allclose(encoder(x), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# losses


def test_attentive_style_loss_properties():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 10, 8, generator=g)
    r = torch.randn(3, 7, 8, generator=g)
    assert difa.attentive_style_loss(t, t).abs().item() < 1e-6
    assert difa.attentive_style_loss(t, 2.5 * t[:, torch.randperm(10)]).abs().item() < 1e-6  # a set, scale-free
    value = difa.attentive_style_loss(t, r)
    assert torch.allclose(value, difa.attentive_style_loss(r, t))  # symmetric
    assert torch.allclose(value, difa.attentive_style_loss(t[:, torch.randperm(10)], r[:, torch.randperm(7)]))
    assert 0 < value.item() <= 2
    assert abs(difa.attentive_style_loss(t[:, :1], -t[:, :1]).item() - 2) < 1e-6  # opposite tokens: the maximum
    # shared [N', D] reference == the same reference repeated per sample; explicit double loop
    shared = r[0]
    assert torch.allclose(difa.attentive_style_loss(t, shared), difa.attentive_style_loss(t, shared.expand(3, -1, -1)))
    per = []
    for b in range(3):
        c = torch.tensor([[1 - F.cosine_similarity(t[b, i], shared[j], dim=0).item() for j in range(7)] for i in range(10)])
        per.append(max(c.min(1).values.mean().item(), c.min(0).values.mean().item()))
    assert abs(difa.attentive_style_loss(t, shared).item() - sum(per) / 3) < 1e-5


def test_global_loss_parallel_and_antiparallel():
    d = F.normalize(torch.randn(6), dim=0)
    emb_a = F.normalize(torch.randn(4, 6), dim=1)
    assert difa.global_clip_loss(emb_a + 0.3 * d, emb_a, d).abs().item() < 1e-6
    assert abs(difa.global_clip_loss(emb_a - 0.3 * d, emb_a, d[None]).item() - 2) < 1e-6
    orth = torch.zeros(6)
    orth[0] = 1
    d2 = torch.zeros(6)
    d2[1] = 1
    assert abs(difa.global_clip_loss(emb_a + orth, emb_a, d2).item() - 1) < 1e-6


def test_reference_direction_renormalises_the_mean_reference():
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(3, 12, generator=g) * torch.tensor([[0.5], [2.0], [7.0]])  # three references, raw norms
    mu = 0.4 * F.normalize(torch.randn(12, generator=g), dim=0)  # |mu| < 1, as a mean of unit vectors
    mean_unit = F.normalize(raw, dim=1).mean(0)
    official = F.normalize(F.normalize(mean_unit, dim=0) - mu, dim=0)  # the release's clip_loss.py
    d = difa.reference_direction(raw, mu)
    assert d.shape == (12,) and torch.allclose(d, official, atol=1e-6)
    assert (d - F.normalize(mean_unit - mu, dim=0)).abs().max() > 1e-2  # the mean is not a unit vector
    assert torch.allclose(difa.reference_direction(raw[1:2], mu), F.normalize(F.normalize(raw[1], dim=0) - mu, dim=0), atol=1e-6)


def test_reference_tokens_first_or_union():
    g = torch.Generator().manual_seed(6)
    tokens = torch.randn(3, 5, 8, generator=g)
    assert torch.equal(difa.reference_tokens(tokens, "first"), tokens[0])  # the release: image 1's tokens only
    union = difa.reference_tokens(tokens, "all")
    assert union.shape == (15, 8) and torch.equal(union[5:10], tokens[1])
    assert torch.equal(difa.reference_tokens(tokens[:1], "all"), difa.reference_tokens(tokens[:1], "first"))
    t = torch.randn(2, 5, 8, generator=g)
    assert not torch.allclose(difa.attentive_style_loss(t, tokens[0]), difa.attentive_style_loss(t, union))


def test_rgba_reference_follows_clip_preprocessing(tmp_path):
    """CLIP's transform drops alpha (convert("RGB") after the crop); it does not composite on white."""
    from torchvision import transforms

    colour = np.array([200, 30, 90], dtype=np.uint8)
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[..., :3] = colour  # non-white colour under alpha 0
    pixels[:, 16:, :3] = [10, 250, 40]
    pixels[:, 16:, 3] = 255
    same = tmp_path / "same.png"
    Image.fromarray(pixels, "RGBA").save(same)
    mean, std = torch.tensor(pretrained.CLIP_MEAN).view(3, 1, 1), torch.tensor(pretrained.CLIP_STD).view(3, 1, 1)
    x = pretrained.load_reference(str(same), 32)[0]  # already 32 px: no resize, stored colours kept
    assert torch.allclose(x[:, :, :16], ((torch.from_numpy(colour).float() / 255).view(3, 1, 1) - mean) / std, atol=1e-6)
    assert (x[:, :, :16] < (1 - mean) / std - 0.5).any(dim=0).all()  # not white
    # a resize: the same pipeline as clip.load's transform, written out with torchvision
    bigger = tmp_path / "bigger.png"
    Image.fromarray(np.concatenate([pixels, pixels[:8]], 0), "RGBA").save(bigger)  # 40 x 32
    clip_transform = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(16),
        lambda image: image.convert("RGB"), transforms.ToTensor(), transforms.Normalize(pretrained.CLIP_MEAN, pretrained.CLIP_STD)])
    x = pretrained.load_reference(str(bigger), 16)[0]
    assert torch.allclose(x, clip_transform(Image.open(bigger)), atol=1e-6)
    assert (x - clip_transform(common.open_rgb(str(bigger)))).abs().max() > 1  # alpha on white would differ


def test_mask_size_and_choice():
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(3584, generator=g)
    mask = difa.scc_mask(dw, 0.6)
    assert mask.sum().item() == 2150 == math.floor(0.6 * 3584)
    assert dw.abs()[mask.bool()].max() < dw.abs()[~mask.bool()].min()  # the least-changed channels
    assert difa.scc_mask(torch.tensor([0.5, -0.1, 0.3, 0.2, -0.9]), 0.4).tolist() == [0, 1, 0, 1, 0]
    assert difa.scc_mask(torch.zeros(5), 0.4).tolist() == [1, 1, 0, 0, 0]  # ties: first channels
    assert difa.scc_mask(dw, 1.0).sum().item() == 3584


def test_scc_loss_normalisation_and_ramp():
    g = torch.Generator().manual_seed(2)
    cb, ca = torch.randn(2, 10, generator=g), torch.randn(2, 10, generator=g)
    mask = (torch.arange(10) % 3 == 0).float()
    expected = (mask * (cb - ca).abs()).sum() / (2 * 10)
    assert torch.allclose(difa.scc_loss(cb, ca, mask), expected)
    assert torch.allclose(difa.scc_loss(cb, ca, mask), F.l1_loss(mask * cb, mask * ca))  # the release's form
    values = [difa.scc_ramp(i, 301, 50) for i in (0, 50, 51, 100, 300)]
    assert values[:2] == [0, 0]
    assert np.allclose(values[2:], [0.00398, 0.1992, 0.99602], atol=1e-5)


def test_queues_fifo_and_delta():
    q = difa.CodeQueues(3)
    for k in range(5):
        q.push(torch.full((2, 4), float(k)), torch.full((2, 4), float(10 * k)))
    assert [t[0].item() for t in q.a] == [2, 3, 4] and [t[0].item() for t in q.b] == [20, 30, 40]
    assert torch.allclose(q.delta_w(), torch.full((4,), 30.0 - 3.0))
    q2 = difa.CodeQueues(3)
    q2.load_state_dict(q.state_dict(), "cpu")
    q2.push(torch.zeros(2, 4), torch.zeros(2, 4))
    assert [t[0].item() for t in q2.a] == [3, 4, 0] and len(q.a) == 3


def test_trainable_set_and_no_nan_at_step_zero(setup):
    _, source, _ = setup
    g_a = load_checkpoint(source, require=("g_ema",))[0]["g_ema"]
    names = {n for n, p in g_a.named_parameters() if any(p is q for q in difa.trainable_generator_parameters(g_a))}
    assert "input.input" in names and "conv1.conv.modulation.weight" in names and "convs.3.noise.weight" in names
    assert not any(n.startswith(("style.", "to_rgb")) for n in names)
    # G_B = G_A at step 0: independent noise keeps E(x_B) - E(x_A) away from 0, no NaN (trained noise strengths)
    for name, p in g_a.named_parameters():
        if name.endswith("noise.weight"):
            p.data.fill_(0.1)
    tower = pretrained.VisionTower(**TINY_CLIP).eval()
    w = g_a.get_latent(torch.randn(2, 16))
    with torch.no_grad():
        x_a, _ = g_a([w], input_is_latent=True)
        x_b, _ = g_a([w], input_is_latent=True)
        ea = F.normalize(tower(pretrained.clip_input(x_a, 32))[0], dim=-1)
        eb = F.normalize(tower(pretrained.clip_input(x_b, 32))[0], dim=-1)
    loss = difa.global_clip_loss(eb, ea, F.normalize(torch.randn(12), dim=0))
    assert torch.isfinite(loss) and (eb - ea).abs().max() > 0


# ------------------------------------------------------------------------------------------------
# end-to-end tiny runs


def run_difa(setup, weights, out, *extra):
    source = weights["source"]  # only g_ema, as DiFa needs
    argv = ["--source", source, "--target", weights["reference"], "--out", str(out), "--clip-weights", weights["clip"],
            "--e4e", weights["e4e"], "--clip-layer", "1", "--clip-mean-samples", "2", "--clip-mean-batch", "2",
            "--sliding-window-size", "2", "--n-sample", "4", "--device", "cpu", *extra]
    return difa.main(argv)


def test_end_to_end_files_and_gradient_routing(setup, weights):
    root, source = setup[0], weights["source"]
    out = root / "run"
    path = run_difa(setup, weights, out, "--iter", "5", "--sample-every", "3", "--save-every", "4")
    assert sorted(os.listdir(out / "checkpoints")) == ["000004.pt", "000005.pt"]
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000003.png", "000005.png"]
    assert Image.open(out / "samples" / "000005.png").size == (2 * (2 * 34 + 2) + 8, 2 * 34 + 2)
    assert os.path.exists(out / "clip_source_mean.pt")
    rows = [r.split(",") for r in open(out / "log.csv").read().split()]
    assert rows[0] == ["iter", "loss", "global", "local", "scc", "scc_ramp"] and len(rows) == 6
    values = np.array(rows[1:], dtype=float)
    assert np.isfinite(values).all()
    assert np.allclose(values[:, 5], [0, 0, 0, 1 / 3, 2 / 3])  # r(i), S = 2, iter 5
    assert (values[:, 2] > 0).all() and (values[:, 3] > 0).all() and (values[:, 4] > 0).all()
    models, raw = load_checkpoint(path, require=("g_ema",))
    assert raw["iter"] == 5 and len(raw["queues"]["a"]) == 2 and raw["queues"]["a"][0].shape == (7 * 16,)
    assert len(raw["clip_source_mean"]) == 2 and raw["clip_source_mean"][0].shape == (12,)
    g_a = load_checkpoint(source, require=("g_ema",))[0]["g_ema"]
    source_params, adapted = dict(g_a.named_parameters()), dict(models["g_ema"].named_parameters())
    changed = {n for n, p in source_params.items() if not torch.equal(p, adapted[n])}
    assert changed == {n for n in source_params if n.split(".")[0] in ("input", "conv1", "convs")}
    assert all(torch.equal(b, dict(models["g_ema"].named_buffers())[n]) for n, b in g_a.named_buffers())
    assert torch.equal(adapted["convs.0.conv.weight"], models["g"].state_dict()["convs.0.conv.weight"])  # g_ema is G_B


def test_resume_is_bit_for_bit(setup, weights):
    root = setup[0]
    flags = ["--save-every", "100", "--sample-every", "100", "--e4e-bn", "train"]
    straight = run_difa(setup, weights, root / "straight", "--iter", "4", *flags)
    run_difa(setup, weights, root / "resumed", "--iter", "2", *flags)
    resumed = run_difa(setup, weights, root / "resumed", "--iter", "4", *flags, "--resume")
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for name, tensor in a["g"].items():
        assert torch.equal(tensor, b["g"][name]), name
    for name, tensor in a["e4e_buffers"].items():
        assert torch.equal(tensor, b["e4e_buffers"][name]), name
    assert all(torch.equal(x, y) for x, y in zip(a["queues"]["b"], b["queues"]["b"]))
    assert open(root / "straight" / "log.csv").read() == open(root / "resumed" / "log.csv").read()


def test_variant_flags(setup, weights):
    root = setup[0]
    out = root / "variant"
    run_difa(setup, weights, out, "--iter", "2", "--psp-model-weight", "0", "--e4e", "/nonexistent/e4e.pt",
             "--no-antialias", "--lambda-partial", "0", "--clip-models", "ViT-B/32", "--clip-weights",
             weights["clip"].split(",")[0], "--clip-model-weights", "2")
    rows = [r.split(",") for r in open(out / "log.csv").read().split()[1:]]
    assert all(float(r[3]) == 0 and float(r[4]) == 0 for r in rows)  # no local loss, no e4e
    assert all(abs(float(r[1]) - float(r[2])) < 1e-5 for r in rows)  # loss = 2 L_global, logged weighted


def test_several_references_wiring(setup, weights, monkeypatch):
    """A folder target: d from all references (re-normalised mean), L_local against the first (sorted) image's
    tokens by default, against all of them with --ref-tokens all."""
    root, _, folder = setup
    references = common.list_images(str(folder))
    clip32 = weights["clip"].split(",")[0]
    seen = {}
    real_loss, real_direction = difa.attentive_style_loss, difa.reference_direction

    def spy_loss(tokens, ref_tokens):
        seen["tokens"] = ref_tokens
        return real_loss(tokens, ref_tokens)

    def spy_direction(ref_emb, mu):
        seen["emb"] = ref_emb
        return real_direction(ref_emb, mu)

    monkeypatch.setattr(difa, "attentive_style_loss", spy_loss)
    monkeypatch.setattr(difa, "reference_direction", spy_direction)
    tower = pretrained.load_vision_tower(clip32)
    with torch.no_grad():
        emb, tokens = tower(torch.cat([pretrained.load_reference(p, 32) for p in references]), return_layers=(1,))
    for mode, expected in (("first", tokens[1][0]), ("all", tokens[1].reshape(-1, tokens[1].shape[-1]))):
        run_difa(setup, {**weights, "reference": str(folder)}, root / f"refs_{mode}", "--iter", "1", "--ref-tokens", mode,
                 "--psp-model-weight", "0", "--clip-models", "ViT-B/32", "--clip-weights", clip32, "--clip-model-weights", "1")
        assert torch.allclose(seen["tokens"], expected, atol=1e-5), mode
        assert torch.allclose(seen["emb"], emb, atol=1e-5)  # all references feed d


def test_missing_default_weights_messages(tmp_path, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    # the loaders live in pretrained.py (difa re-exports them): their default paths are looked up there
    monkeypatch.setattr(pretrained, "default_clip_path", lambda name: str(tmp_path / name.replace("/", "-")) + ".pt")
    monkeypatch.setattr(pretrained, "default_e4e_path", lambda: str(tmp_path / "e4e_ffhq_encode.pt"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(common.UserError) as error:
        pretrained.resolve_clip_file("ViT-B/16", None)
    message = str(error.value)
    assert "ViT-B-16.pt" in message and pretrained.CLIP_URLS["ViT-B/16"] in message and "could not be downloaded" in message
    (tmp_path / "ViT-B-32.pt").write_bytes(b"cached")
    assert pretrained.resolve_clip_file("ViT-B/32", None) == str(tmp_path / "ViT-B-32.pt")  # the cache is used as is
    with pytest.raises(common.UserError) as error:
        pretrained.load_e4e(None)
    assert "e4e_ffhq_encode.pt" in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    assert pretrained.CLIP_URLS["ViT-B/32"].split("/")[-2].startswith("40d36571")  # sha256 of OpenAI's file


def test_bad_input_one_line_errors(setup, weights, tmp_path):
    _, source, _ = setup
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    not_clip = tmp_path / "notclip.pt"
    torch.save({"weight": torch.zeros(2)}, not_clip)
    ok = ["--clip-weights", weights["clip"], "--e4e", weights["e4e"], "--clip-layer", "1", "--clip-mean-samples", "2"]
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")]
    ref = weights["reference"]
    cases = [
        (["--source", source, "--target", str(tmp_path / "missing.png"), *ok], "target not found"),
        (["--source", source, "--target", str(corrupt), *ok], "cannot read image"),
        (["--source", str(tmp_path / "nope.pt"), "--target", ref, *ok], "checkpoint not found"),
        (["--source", source, "--target", ref, *ok[2:], "--clip-weights", f"{tmp_path}/x.pt,{tmp_path}/y.pt"], "CLIP weights not found"),
        (["--source", source, "--target", ref, *ok[2:], "--clip-weights", f"{not_clip},{not_clip}"], "no ViT image tower"),
        (["--source", source, "--target", ref, *ok[:2], *ok[4:], "--e4e", str(tmp_path / "e4e.pt")], "e4e weights not found"),
        (["--source", source, "--target", ref, *ok[:4], "--clip-layer", "9", "--clip-mean-samples", "2"], "--clip-layer 9"),
        (["--source", source, "--target", ref, *ok, "--num-keep-first", "9"], "--num-keep-first 9"),
        (["--source", source, "--target", ref, *ok, "--resume"], "no checkpoint"),
    ]
    assert_cli_errors("difa.py", cases, base)


# ------------------------------------------------------------------------------------------------
# zero-shot text targets and the StyleGAN-NADA baseline

TINY_MERGES = ["p h", "o t", "ph ot", "phot o</w>", "s k", "e t", "sk et", "sket ch</w>", "a </w>", "o f</w>"]


def write_clip_with_text(path, seed, vocab, **config):
    """A tiny CLIP file in OpenAI's plain state-dict layout with both towers (visual.* and the text keys)."""
    torch.manual_seed(seed)
    vision = pretrained.VisionTower(**{**TINY_CLIP, **config})
    text = pretrained.TextTower(vocab_size=pretrained.vocab_size(vocab), context_length=77, width=32, layers=1,
                                embed_dim=vision.proj.shape[1])
    state = {"visual." + k: v for k, v in vision.state_dict().items()}
    state.update(text.state_dict(), logit_scale=torch.tensor(4.6052))
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def text_weights(setup, weights):
    import gzip

    root = setup[0]
    vocab = root / "toy_vocab.txt.gz"
    with gzip.open(vocab, "wb") as file:
        file.write(("#version: toy\n" + "\n".join(TINY_MERGES) + "\n").encode("utf-8"))
    clips = [write_clip_with_text(root / "clip_text_a.pt", 7, str(vocab)), write_clip_with_text(root / "clip_text_b.pt", 8, str(vocab), patch=4)]
    return {**weights, "clip": ",".join(clips), "vocab": str(vocab)}


def test_text_direction_matches_direct_computation(text_weights):
    assert len(difa.NADA_TEMPLATES) == 79 and difa.NADA_TEMPLATES[0] == "a bad photo of a {}." and difa.NADA_TEMPLATES[-1] == "a tattoo of the {}."
    tower = pretrained.load_text_tower(text_weights["clip"].split(",")[0])
    vocab = text_weights["vocab"]
    target = difa.prompt_embeddings(tower, "a sketch", vocab)
    source = difa.prompt_embeddings(tower, "photo", vocab)
    d = difa.text_direction(target, source)

    def unit(prompt):  # one prompt at a time, OpenAI's encode_text, then / |.|
        e = tower(pretrained.tokenize(prompt, vocab=vocab).long())[0]
        return e / e.norm()

    t = torch.stack([unit(k.format("a sketch")) for k in difa.NADA_TEMPLATES])
    s = torch.stack([unit(k.format("photo")) for k in difa.NADA_TEMPLATES])
    direct = (t - s).mean(0)
    direct = direct / direct.norm()
    assert d.shape == (12,) and torch.allclose(d, direct, atol=1e-5)
    raw_t = torch.stack([tower(pretrained.tokenize(k.format("a sketch"), vocab=vocab).long())[0] for k in difa.NADA_TEMPLATES])
    raw_s = torch.stack([tower(pretrained.tokenize(k.format("photo"), vocab=vocab).long())[0] for k in difa.NADA_TEMPLATES])
    assert (d - F.normalize(raw_t.mean(0) - raw_s.mean(0), dim=0)).abs().max() > 1e-3  # NADA normalises each template first
    alone = difa.prompt_embeddings(tower, "a sketch", vocab, ("{}",))
    assert alone.shape == (1, 12) and torch.allclose(alone[0], unit("a sketch"), atol=1e-5)
    # NADA's image direction: the mean reference is not re-normalised (DiFa's is); equal for one reference
    g = torch.Generator().manual_seed(9)
    refs, mu = torch.randn(3, 12, generator=g), 0.3 * F.normalize(torch.randn(12, generator=g), dim=0)
    assert torch.allclose(nada.nada_image_direction(refs, mu), F.normalize(F.normalize(refs, dim=1).mean(0) - mu, dim=0), atol=1e-6)
    assert torch.allclose(nada.nada_image_direction(refs[:1], mu), difa.reference_direction(refs[:1], mu), atol=1e-6)
    assert (nada.nada_image_direction(refs, mu) - difa.reference_direction(refs, mu)).abs().max() > 1e-3
    assert nada.global_clip_loss is difa.global_clip_loss and nada.prompt_embeddings is difa.prompt_embeddings  # reused, not copied


def test_layer_selection_picks_the_layers_that_move_most():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(3, 8, 5, generator=g)
    pull = torch.tensor([0.1, 5.0, 0.2, 3.0, -4.0, 0.01, 0.3, 0.5])  # dL/dw+_l = pull_l: layer l moves lr |pull_l| per step

    def loss_fn(w):
        return (w * pull.view(1, -1, 1)).sum()

    chosen, loss = nada.select_layers(w0, loss_fn, 2, 0.01, 3)
    assert chosen == [1, 4, 3] and torch.isclose(loss, loss_fn(w0 - 0.01 * pull.view(1, -1, 1)))
    moved, _ = nada.optimise_wplus(w0, loss_fn, 2, 0.01)
    assert torch.allclose(nada.layer_movement(w0, moved), 0.02 * pull.abs(), atol=1e-6)
    assert not w0.requires_grad and nada.optimise_wplus(w0, loss_fn, 0, 0.01)[1] is None
    # a CLIP-shaped loss: only the target-aligned layers move
    emb = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    target = F.normalize(torch.randn(6, generator=g), dim=0)
    assert torch.isclose(nada.clip_similarity_loss(emb, target), (1 - F.cosine_similarity(emb, target[None], dim=1)).mean())


def run_nada(weights, out, *extra, entry="nada"):
    """A tiny NADA run: `python nada.py ...`, or (entry difa) the same run as `python difa.py --baseline nada ...`."""
    argv = ["--source", weights["source"], "--out", str(out), "--clip-weights", weights["clip"],
            "--auto-layer-batch", "2", "--img2img-batch", "2", "--clip-mean-batch", "2", "--n-sample", "2",
            "--sample-every", "100", "--device", "cpu", *extra]
    return nada.main(argv) if entry == "nada" else difa.main(["--baseline", "nada", *argv])


def test_nada_trains_only_the_chosen_layers(setup, weights, monkeypatch):
    g_a = load_checkpoint(weights["source"], require=("g_ema",))[0]["g_ema"]
    layers = nada.nada_layers(g_a)
    assert len(layers) == g_a.n_latent == 8 and layers[1] is g_a.to_rgb1 and layers[2] is g_a.convs[0]
    seen = []
    real = nada.select_layers

    def spy(*args):
        chosen, loss = real(*args)
        seen.append(chosen)
        return chosen, loss

    monkeypatch.setattr(nada, "select_layers", spy)
    out = setup[0] / "nada_image"
    path = run_nada(weights, out, "--target", weights["reference"], "--iter", "1", "--auto-layer-k", "2")
    assert len(seen) == 1 and len(seen[0]) == 2
    adapted = load_checkpoint(path, require=("g_ema",))[0]["g_ema"]
    names = {n for n, _ in g_a.named_parameters()}
    prefixes = [f"{p}." for p in ("conv1", "to_rgb1", *[f"convs.{j}" for j in range(6)])]  # W+ index -> layer, NADA's order
    source, after = dict(g_a.named_parameters()), dict(adapted.named_parameters())
    changed = {n for n in names if not torch.equal(source[n], after[n])}
    assert changed <= {n for n in names if n.startswith(tuple(prefixes[j] for j in seen[0]))}  # all else unchanged
    assert all(any(n.startswith(prefixes[j]) for n in changed) for j in seen[0])  # each chosen layer moved
    rows = [r.split(",") for r in open(out / "log.csv").read().split()]
    assert rows[0] == ["iter", "loss", "global", "select"] and len(rows) == 2


def test_nada_text_run_and_resume(setup, text_weights):
    root = setup[0]
    flags = ["--target-text", "a sketch", "--clip-vocab", text_weights["vocab"], "--auto-layer-k", "3", "--save-every", "1"]
    straight = run_nada(text_weights, root / "nada_text", "--iter", "3", *flags)
    assert sorted(os.listdir(root / "nada_text" / "checkpoints")) == ["000001.pt", "000002.pt", "000003.pt"]
    rows = [r.split(",") for r in open(root / "nada_text" / "log.csv").read().split()]
    assert rows[0] == ["iter", "loss", "global", "select"] and np.isfinite(np.array(rows[1:], dtype=float)).all()
    run_nada(text_weights, root / "nada_resumed", "--iter", "2", *flags, entry="difa")  # the same run through difa.py
    resumed = run_nada(text_weights, root / "nada_resumed", "--iter", "3", *flags, "--resume", entry="difa")
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert all(torch.equal(t, b["g"][n]) for n, t in a["g"].items())
    assert a["run_args"]["baseline"] == "nada" and a["args"]["target_text"] == "a sketch"


def test_zero_shot_difa_run(setup, text_weights, monkeypatch):
    """--target-text: d_m is the text direction of each model's own text tower (here of --prompt-template's prompts),
    no L_local, SCC stays."""
    root = setup[0]
    clips = text_weights["clip"].split(",")
    expected = []
    for path in clips:
        tower = pretrained.load_text_tower(path)
        expected.append(difa.text_direction(difa.prompt_embeddings(tower, "pencil sketch", text_weights["vocab"], ("a {} of a face",)),
                                            difa.prompt_embeddings(tower, "photo", text_weights["vocab"], ("a {} of a face",))))
    seen = []
    real = difa.global_clip_loss

    def spy(emb_b, emb_a, direction):
        seen.append(direction)
        return real(emb_b, emb_a, direction)

    monkeypatch.setattr(difa, "global_clip_loss", spy)
    monkeypatch.setattr(difa, "attentive_style_loss", None)  # never called
    out = root / "zero_shot"
    argv = ["--source", text_weights["source"], "--target-text", "pencil sketch", "--prompt-template", "a {} of a face",
            "--out", str(out), "--clip-weights", text_weights["clip"],
            "--clip-vocab", text_weights["vocab"], "--e4e", text_weights["e4e"], "--sliding-window-size", "1", "--iter", "2",
            "--save-every", "1", "--sample-every", "100", "--n-sample", "2", "--device", "cpu"]
    difa.main(argv)
    assert sorted(os.listdir(out / "checkpoints")) == ["000001.pt", "000002.pt"] and not os.path.exists(out / "clip_source_mean.pt")
    assert len(seen) == 4 and all(torch.allclose(d, expected[k % 2], atol=1e-6) for k, d in enumerate(seen))
    rows = [r.split(",") for r in open(out / "log.csv").read().split()]
    assert rows[0] == ["iter", "loss", "global", "scc", "scc_ramp"]
    assert all(float(r[3]) > 0 for r in rows[1:])  # L_scc computed (its ramp r(i) is 0 for i <= S)


def test_text_target_arguments(setup, capsys):
    _, source, _ = setup
    args = difa.parse_args(["--source", source, "--target-text", "A Pencil sketch!"])
    assert args.target == "a-pencil-sketch" and args.out == os.path.join("runs", "difa-a-pencil-sketch") and not args.demo
    assert args.source_text == "photo" and args.sample_truncation == 0.5 and args.save_every == 300
    demo = difa.parse_args(["--target-text", "a pencil sketch"])  # the demo source, no reference image
    assert demo.demo and demo.source == runtime.DEMO_SOURCE and demo.target == "a-pencil-sketch"
    assert demo.prompt_template == "a {} of a face" and args.prompt_template is None  # the toy CLIP's caption grammar
    nada = difa.parse_args(["--baseline", "nada", "--source", source, "--target-text", "x"])
    assert nada.save_every == 150 and nada.sample_truncation == 0.7 and nada.auto_layer_k is None and nada.auto_layer_iters == 1
    capsys.readouterr()


def test_text_and_nada_one_line_errors(setup, weights, tmp_path, capsys):
    _, source, _ = setup
    base = ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out"), "--clip-weights", weights["clip"], "--source", source]
    ref = ["--target", weights["reference"]]
    cases = [
        (["--target-text", "a sketch", *ref], "--target-text and --target are exclusive"),
        (["--baseline", "nada", *ref, "--auto-layer-k", "0"], "--auto-layer-k must be at least 1"),
        (["--baseline", "nada", *ref, "--auto-layer-k", "9"], "--auto-layer-k 9 exceeds the generator's 8 W+ layers"),
        ([*ref, "--auto-layer-k", "2"], "--auto-layer-k is a StyleGAN-NADA option"),
        (["--baseline", "nada", *ref, "--lambda-partial", "2"], "--lambda-partial is a DiFa option"),
        (["--target-text", " "], "must not be empty"),
        ([*ref, "--source-text", "photo"], "--source-text goes with --target-text"),
        ([*ref, "--prompt-template", "a {} of a face"], "--prompt-template goes with --target-text"),
        (["--target-text", "a sketch", "--prompt-template", "a face"], "--prompt-template needs exactly one {}"),
        (["--target-text", "a sketch"], "no text tower"),  # the image-only CLIP files
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            runtime.run_main(difa.main, [*base, *args])
        stderr = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and stderr.startswith("error: ") and message in stderr and "\n" not in stderr, stderr
