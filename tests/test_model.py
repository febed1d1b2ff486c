"""Generator / Discriminator structure (rosinality's names and shapes), features, and checkpoint loading."""

import argparse
import os

import pytest
import torch

from checkpoints import CheckpointError, infer_discriminator_config, infer_generator_config, load_checkpoint, read_checkpoint
from stylegan2 import Discriminator, Generator


def meta(cls, *args, **kwargs):
    with torch.device("meta"):
        return cls(*args, **kwargs)


def test_generator_256_state_dict_is_rosinality():
    sd = meta(Generator, 256).state_dict()
    assert len(sd) == 135
    assert sum(v.numel() for k, v in sd.items() if not k.startswith("noises.") and not k.endswith("kernel")) == 30034338
    expected = {
        "style.1.weight": (512, 512),
        "style.8.bias": (512,),
        "input.input": (1, 512, 4, 4),
        "conv1.conv.weight": (1, 512, 512, 3, 3),
        "conv1.conv.modulation.weight": (512, 512),
        "conv1.noise.weight": (1,),
        "conv1.activate.bias": (512,),
        "to_rgb1.bias": (1, 3, 1, 1),
        "to_rgb1.conv.weight": (1, 3, 512, 1, 1),
        "convs.0.conv.blur.kernel": (4, 4),
        "convs.8.conv.weight": (1, 256, 512, 3, 3),
        "convs.11.conv.weight": (1, 128, 128, 3, 3),
        "convs.11.activate.bias": (128,),
        "to_rgbs.5.upsample.kernel": (4, 4),
        "to_rgbs.5.conv.weight": (1, 3, 128, 1, 1),
        "noises.noise_0": (1, 1, 4, 4),
        "noises.noise_12": (1, 1, 256, 256),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "convs.1.conv.blur.kernel" not in sd  # only the up-sampling convs blur
    assert not any(k.startswith("to_rgb1.upsample") for k in sd)
    g = meta(Generator, 256)
    assert (g.n_latent, g.num_layers, g.log_size) == (14, 13, 8)


def test_discriminator_256_state_dict_is_rosinality():
    sd = meta(Discriminator, 256).state_dict()
    assert len(sd) == 50
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("kernel")) == 28864129
    expected = {
        "convs.0.0.weight": (128, 3, 1, 1),
        "convs.0.1.bias": (128,),
        "convs.1.conv1.0.weight": (128, 128, 3, 3),
        "convs.1.conv2.0.kernel": (4, 4),
        "convs.1.conv2.1.weight": (256, 128, 3, 3),
        "convs.1.conv2.2.bias": (256,),
        "convs.1.skip.0.kernel": (4, 4),
        "convs.1.skip.1.weight": (256, 128, 1, 1),
        "convs.6.conv2.1.weight": (512, 512, 3, 3),
        "final_conv.0.weight": (512, 513, 3, 3),
        "final_linear.0.weight": (512, 8192),
        "final_linear.1.weight": (1, 512),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_channel_cap_keeps_names_and_narrows_channels():
    full = meta(Generator, 64, channel_multiplier=1).state_dict()
    capped = meta(Generator, 64, channel_multiplier=1, channel_cap=32).state_dict()
    assert list(full) == list(capped)
    assert capped["conv1.conv.weight"].shape == (1, 32, 32, 3, 3)
    assert max(v.shape[1] for k, v in capped.items() if k.endswith("conv.weight")) == 32
    d_full = meta(Discriminator, 64).state_dict()
    d_capped = meta(Discriminator, 64, channel_cap=16).state_dict()
    assert list(d_full) == list(d_capped)
    assert d_capped["final_linear.0.weight"].shape == (16, 16 * 16)


def tiny_g(**kw):
    return Generator(32, style_dim=16, n_mlp=2, channel_cap=16, **kw)


def test_generator_forward_modes():
    g = tiny_g()
    z = torch.randn(2, 16)
    img, latent = g([z], return_latents=True, randomize_noise=False)
    assert img.shape == (2, 3, 32, 32) and latent.shape == (2, g.n_latent, 16)
    # fixed noise buffers: deterministic
    assert torch.equal(g([z], randomize_noise=False)[0], img)
    # random noise changes the image (noise weights are non-zero)
    for m in g.modules():
        if m.__class__.__name__ == "NoiseInjection":
            m.weight.data.fill_(0.5)
    a, _ = g([z])
    b, _ = g([z])
    assert not torch.allclose(a, b)
    # explicit noise list equals the buffers
    noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
    assert torch.equal(g([z], noise=noise)[0], g([z], randomize_noise=False)[0])
    assert [n.shape[-1] for n in g.make_noise()] == [n.shape[-1] for n in noise]
    # W+ input equals the repeated w
    w = g.get_latent(z)
    wplus = w[:, None].repeat(1, g.n_latent, 1)
    assert torch.allclose(g([wplus], input_is_latent=True, randomize_noise=False)[0], g([z], randomize_noise=False)[0], atol=1e-6)
    # style mixing at inject_index k: rows < k from style 0, rows >= k from style 1
    z2 = torch.randn(2, 16)
    _, mixed = g([z, z2], inject_index=3, return_latents=True)
    assert torch.allclose(mixed[:, :3], g.get_latent(z)[:, None].expand(-1, 3, -1))
    assert torch.allclose(mixed[:, 3:], g.get_latent(z2)[:, None].expand(-1, g.n_latent - 3, -1))
    # truncation: w' = w_avg + psi (w - w_avg)
    w_avg = g.mean_latent(64)
    assert w_avg.shape == (1, 16)
    _, tl = g([z], truncation=0.5, truncation_latent=w_avg, return_latents=True)
    assert torch.allclose(tl[:, 0], w_avg + 0.5 * (w - w_avg), atol=1e-6)


def test_generator_feats_are_styled_conv_outputs():
    g = tiny_g()
    z = torch.randn(2, 16)
    captured = []
    hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o)) for m in [g.conv1, *g.convs]]
    img, feats = g([z], return_feats=True, randomize_noise=False)
    for h in hooks:
        h.remove()
    assert len(feats) == g.num_layers == 7
    assert [f.shape[-1] for f in feats] == [4, 8, 8, 16, 16, 32, 32]
    for a, b in zip(feats, captured):
        assert torch.equal(a, b)
    img2, latent, feats2 = g([z], return_feats=True, return_latents=True, randomize_noise=False)
    assert torch.equal(img, img2) and len(feats2) == 7 and latent.shape == (2, g.n_latent, 16)
    assert torch.equal(img, g([z], randomize_noise=False)[0])
    # stopping early gives the same first maps and skips the rest
    for k in (0, 3, 6):
        none, partial = g([z], return_feats=True, randomize_noise=False, feats_upto=k)
        assert none is None and len(partial) == k + 1
        assert all(torch.equal(a, b) for a, b in zip(partial, feats))
    with pytest.raises(ValueError):
        g([z], return_feats=True, feats_upto=7)


def test_discriminator_feature_maps_and_early_stop():
    d = Discriminator(64, channel_cap=32)
    x = torch.randn(4, 3, 64, 64)
    logits, feats = d(x, return_feats=True)
    assert torch.allclose(logits, d(x), atol=1e-6)
    assert len(feats) == d.n_feature_maps == 10
    assert [tuple(f.shape[1:]) for f in feats] == [(c, r, r) for c, r in d.feature_map_shapes()]
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, b in d.named_modules() if n.count(".") == 2]
    partial = d.feature_maps(x, stop_after=4)
    for h in hooks:
        h.remove()
    assert len(partial) == 5
    for a, b in zip(partial, feats):
        assert torch.allclose(a, b, atol=1e-6)
    # map 4 is convs[2].conv2: nothing of convs[2].skip or later blocks ran
    assert "convs.2.skip" not in calls and not any(c.startswith(("convs.3", "final")) for c in calls)
    assert "convs.2.conv2" in calls
    with pytest.raises(ValueError):
        d.feature_maps(x, stop_after=10)


def test_minibatch_stddev_formula():
    d = Discriminator(16, channel_cap=8)
    out = torch.randn(8, 8, 4, 4)
    res = d.minibatch_stddev(out)
    assert res.shape == (8, 9, 4, 4)
    # sample b is grouped with the samples of the same b mod 2 (group 4, batch 8)
    for b in range(8):
        members = out[b % 2 :: 2]
        expected = torch.sqrt(members.var(0, unbiased=False) + 1e-8).mean()
        assert torch.allclose(res[b, 8], expected.expand(4, 4), atol=1e-6)
    with pytest.raises(ValueError):
        d.minibatch_stddev(torch.randn(6, 8, 4, 4))


# ------------------------------------------------------------------------------------------------
# checkpoints


def save_rosinality(path, g, d, g_ema=None, prefix=""):
    state = {
        "g": {prefix + k: v for k, v in g.state_dict().items()},
        "d": d.state_dict(),
        "g_ema": (g_ema or g).state_dict(),
        "g_optim": torch.optim.Adam(g.parameters(), lr=0.002, betas=(0.0, 0.99)).state_dict(),
        "d_optim": torch.optim.Adam(d.parameters(), lr=0.002, betas=(0.0, 0.99)).state_dict(),
        "args": argparse.Namespace(size=g.size, batch=16, lr=0.002, path="data.lmdb", augment=False, ckpt=None),
        "ada_aug_p": 0.0,
    }
    torch.save(state, path)


@pytest.mark.parametrize(
    "gkw",
    [
        dict(size=32, style_dim=16, n_mlp=2, channel_cap=16),
        dict(size=64, style_dim=8, n_mlp=3, channel_multiplier=1, channel_cap=64),
        dict(size=16, style_dim=32, n_mlp=1),
    ],
)
def test_checkpoint_round_trip_strict_and_inference(tmp_path, gkw):
    g = Generator(**gkw)
    g_ema = Generator(**gkw)
    d = Discriminator(gkw["size"], channel_multiplier=gkw.get("channel_multiplier", 2), channel_cap=gkw.get("channel_cap"))
    path = str(tmp_path / "ckpt.pt")
    save_rosinality(path, g, d, g_ema, prefix="module.")
    models, raw = load_checkpoint(path)
    assert set(models) == {"g", "g_ema", "d"} and isinstance(raw["args"], argparse.Namespace)
    expected = dict(channel_multiplier=2, channel_cap=None)
    expected.update(gkw)
    got = models["g"]
    assert (got.size, got.style_dim, got.n_mlp, got.channel_cap) == (
        expected["size"], expected["style_dim"], expected["n_mlp"], expected["channel_cap"]
    )
    for name, model in (("g", g), ("g_ema", g_ema), ("d", d)):
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), models[name].state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
    z = torch.randn(2, gkw["style_dim"])
    assert torch.equal(models["g_ema"]([z], randomize_noise=False)[0], g_ema([z], randomize_noise=False)[0])


def test_config_inference_full_width():
    g = meta(Generator, 256, channel_multiplier=1)
    assert infer_generator_config(g.state_dict()) == dict(size=256, style_dim=512, n_mlp=8, channel_multiplier=1, channel_cap=None)
    d = meta(Discriminator, 256, channel_multiplier=2)
    assert infer_discriminator_config(d.state_dict()) == dict(size=256, channel_multiplier=2, channel_cap=None)


def error_of(path, **kw):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_checkpoint_errors(tmp_path):
    assert "not found" in error_of(tmp_path / "missing.pt")
    assert "directory" in error_of(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    assert "not a PyTorch checkpoint" in error_of(garbage)

    g = Generator(16, style_dim=8, n_mlp=1, channel_cap=8)
    d = Discriminator(16, channel_cap=8)
    only_ema = tmp_path / "g_ema_only.pt"
    torch.save({"g_ema": g.state_dict(), "latent_avg": torch.zeros(8)}, only_ema)
    message = error_of(only_ema)
    assert "no 'g' or 'd' (only 'g_ema')" in message and "fine-tunes the source discriminator" in message
    assert "no 'd'" in error_of(only_ema, require=("g_ema", "d")) and "fine-tunes the source discriminator" in error_of(only_ema, require=("g_ema", "d"))
    models, _ = load_checkpoint(str(only_ema), require=("g_ema",))
    assert set(models) == {"g_ema"}

    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, other)
    assert "not a StyleGAN2 checkpoint" in error_of(other)

    bare = tmp_path / "bare.pt"
    torch.save(g.state_dict(), bare)
    assert "bare generator state dict" in error_of(bare)

    broken = tmp_path / "broken.pt"
    sd = g.state_dict()
    sd["convs.1.conv.weight"] = torch.zeros(1, 8, 8, 5, 5)
    torch.save({"g": sd, "g_ema": g.state_dict(), "d": d.state_dict()}, broken)
    message = error_of(broken)
    assert "matches no StyleGAN2 generator configuration" in message and "convs.1.conv.weight" in message

    missing_key = tmp_path / "missing_key.pt"
    sd = g.state_dict()
    del sd["convs.0.noise.weight"]
    torch.save({"g": sd, "g_ema": g.state_dict(), "d": d.state_dict()}, missing_key)
    assert "missing convs.0.noise.weight" in error_of(missing_key)

    mixed = tmp_path / "mixed.pt"
    torch.save({"g": g.state_dict(), "g_ema": g.state_dict(), "d": Discriminator(32, channel_cap=8).state_dict()}, mixed)
    assert "disagree on resolution" in error_of(mixed)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"g": {}, "payload": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    assert "refusing to unpickle" in str(info.value)


def test_importing_compiles_nothing():
    import subprocess
    import sys

    code = (
        "import sys, stylegan2, common; "
        "print(any(m.startswith('torch.utils.cpp_extension') for m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "False"
