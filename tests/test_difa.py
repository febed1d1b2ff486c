"""difa.py: the losses and mask as pure functions, the CLIP tower and e4e loaders on state dicts in the official
key layouts (tiny random configurations), and end-to-end tiny runs on CPU."""

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import difa
from stylegan2 import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = dict(width=32, layers=2, patch=8, resolution=32, out_dim=12)
TINY_E4E = dict(widths=(4, 8, 12, 16), units=(1, 2, 2, 1), style_dim=16, n_styles=8, size=32, se_reduction=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread is faster than two when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    tower = difa.VisionTower(**{**TINY_CLIP, **config})
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
    encoder = difa.E4E(**{**TINY_E4E, "n_styles": n_styles, **config})
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
    tower = difa.VisionTower(width=64, layers=4, patch=8, resolution=32, out_dim=16)
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
            real = difa.VisionTower(patch=patch)
            emb, tokens = real(torch.empty(2, 3, 224, 224), return_layers=(3,))
        assert emb.shape == (2, 512) and tokens[3].shape == (2, n, 768)
        assert real.state_dict()["positional_embedding"].shape == (n + 1, 768)
        assert real.transformer.resblocks[0].attn.heads == 12


def test_attention_matches_torch_multihead_attention():
    tower = difa.VisionTower(width=64, layers=1, patch=8, resolution=16, out_dim=8)
    attn = tower.transformer.resblocks[0].attn
    ref = torch.nn.MultiheadAttention(64, 1, batch_first=True)
    assert attn.heads == 1
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 64)
    assert torch.allclose(attn(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


def test_tower_matches_sequence_first_reference():
    """The whole tower against a direct sequence-first forward built from torch's own modules on the same
    visual.* state dict (the computation OpenAI's VisionTransformer runs), embedding and block tokens."""
    tower = difa.VisionTower(width=64, layers=3, patch=8, resolution=32, out_dim=10).eval()
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
    loaded = difa.load_vision_tower(path)
    assert difa.vision_config({k: v for k, v in tower.state_dict().items()}) == {**TINY_CLIP, "layers": 3}
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
    loaded = difa.load_e4e(path)
    assert difa.e4e_config({k: v for k, v in encoder.state_dict().items() if k != "latent_avg"}) == TINY_E4E
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
        real = difa.E4E()
    assert real.taps[1:] == [6, 20, 23] and len(real.body) == 24 and len(real.styles) == 18
    assert len(real.styles[0].convs) == 8 and len(real.styles[3].convs) == 10 and len(real.styles[17].convs) == 12
    assert difa.e4e_config(real.state_dict()) == dict(widths=(64, 128, 256, 512), units=(3, 4, 14, 3), style_dim=512,
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
    tower = difa.VisionTower(**TINY_CLIP).eval()
    w = g_a.get_latent(torch.randn(2, 16))
    with torch.no_grad():
        x_a, _ = g_a([w], input_is_latent=True)
        x_b, _ = g_a([w], input_is_latent=True)
        ea = F.normalize(tower(difa.clip_input(x_a, 32))[0], dim=-1)
        eb = F.normalize(tower(difa.clip_input(x_b, 32))[0], dim=-1)
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


def test_missing_default_weights_messages(tmp_path, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(difa, "default_clip_path", lambda name: str(tmp_path / name.replace("/", "-")) + ".pt")
    monkeypatch.setattr(difa, "default_e4e_path", lambda: str(tmp_path / "e4e_ffhq_encode.pt"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(common.UserError) as error:
        difa.resolve_clip_file("ViT-B/16", None)
    message = str(error.value)
    assert "ViT-B-16.pt" in message and difa.CLIP_URLS["ViT-B/16"] in message and "could not be downloaded" in message
    (tmp_path / "ViT-B-32.pt").write_bytes(b"cached")
    assert difa.resolve_clip_file("ViT-B/32", None) == str(tmp_path / "ViT-B-32.pt")  # the cache is used as is
    with pytest.raises(common.UserError) as error:
        difa.load_e4e(None)
    assert "e4e_ffhq_encode.pt" in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    assert difa.CLIP_URLS["ViT-B/32"].split("/")[-2].startswith("40d36571")  # sha256 of OpenAI's file


def run_cli(*args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "difa.py"), *args], capture_output=True, text=True, cwd=ROOT)
    return result.returncode, result.stderr.strip()


def test_bad_input_one_line_errors(setup, weights, tmp_path, capsys):
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
    for k, (args, message) in enumerate(cases):
        if k == 0:  # through the command line
            code, stderr = run_cli(*args, *base)
        else:  # in process (same run_main), to keep the test fast
            with pytest.raises(SystemExit) as exit_info:
                common.run_main(difa.main, [*args, *base])
            code, stderr = exit_info.value.code, capsys.readouterr().err.strip()
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and message in stderr and "\n" not in stderr, stderr
