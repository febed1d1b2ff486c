"""The demo's toy CLIP and toy e4e as shipped (demo/toyclip.pt with demo/toyclip_vocab.txt.gz, demo/toye4e.pt):
they load through pretrained.py's readers of OpenAI's and e4e's files unchanged, and do their jobs on a few
fixed faces the networks never saw."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrained
from demo import toyclip, toye4e, toyfaces
from checkpoints import load_checkpoint

SEEDS = range(toyclip.EVAL_SEED_START, toyclip.EVAL_SEED_START + 4)  # held-out faces (toyclip's evaluation range)
MAX_BYTES = 10 * 2**20


@pytest.fixture(scope="module")
def towers():
    return pretrained.load_vision_tower(toyclip.TOYCLIP_PATH), pretrained.load_text_tower(toyclip.TOYCLIP_PATH)


def test_toyclip_loads_as_an_openai_file(towers):
    vision, text = towers
    assert os.path.getsize(toyclip.TOYCLIP_PATH) < MAX_BYTES
    assert (vision.resolution, vision.patch, vision.depth) == (16, 2, 4)
    assert text.context_length == 32
    assert text.token_embedding.num_embeddings == pretrained.vocab_size(toyclip.VOCAB_PATH)
    assert vision.proj.shape[1] == text.text_projection.shape[1]  # one shared embedding space
    assert "logit_scale" in torch.load(toyclip.TOYCLIP_PATH, weights_only=True)


def test_vocab_tokenizes_the_captions_without_byte_fallbacks():
    tokenizer = pretrained.load_tokenizer(toyclip.VOCAB_PATH)
    first_merge = 2 * 256  # ids below are single byte symbols
    texts = [phrase for phrases in toyclip.STYLE_PHRASES.values() for phrase in phrases]
    texts += [", ".join(toyclip.attributes(toyfaces.sample_params(s), style)) for s in SEEDS for style in toyfaces.STYLES]
    for text in texts:
        for word in pretrained.split_pattern().findall(text):
            ids = tokenizer.encode(word)
            assert len(ids) == 1 and (len(word) == 1 or ids[0] >= first_merge), (word, ids)
    # the longest training caption fits the 32-token context
    longest = max(toyclip.STYLE_PHRASES["sunglasses"], key=len)
    attributes = sorted(toyclip.attributes(toyfaces.sample_params(SEEDS[0]), "sunglasses"), key=len)[-toyclip.MAX_ATTRIBUTES:]
    pretrained.tokenize(", ".join([longest, *attributes]), 32, vocab=toyclip.VOCAB_PATH)


def test_toyclip_ranks_the_right_style_prompt_first(towers):
    """Most of eight held-out renders per style (its held-out zero-shot accuracy, docs/demo-and-testbed.md demo table, is 0.9 or more in every style)."""
    vision, text = towers
    seeds = range(toyclip.EVAL_SEED_START, toyclip.EVAL_SEED_START + 8)
    with torch.no_grad():
        prompts = F.normalize(text(pretrained.tokenize(toyclip.PROMPTS, 32, vocab=toyclip.VOCAB_PATH)), dim=-1)  # [3, D]
        for k, style in enumerate(toyfaces.STYLES):
            images = toyfaces.render_batch(seeds, style, 32)  # [8, 3, 32, 32]
            emb = F.normalize(vision(pretrained.clip_input(images, vision.resolution))[0], dim=-1)  # [8, D]
            assert ((emb @ prompts.t()).argmax(1) == k).sum() >= 6, style


def test_toye4e_loads_and_beats_the_mean_code():
    assert os.path.getsize(toye4e.TOYE4E_PATH) < MAX_BYTES
    encoder = pretrained.load_e4e(toye4e.TOYE4E_PATH)
    models, _ = load_checkpoint(toye4e.SOURCE_PATH, require=("g_ema",))
    g = models["g_ema"]
    assert encoder.latent_avg.shape == (g.n_latent, g.style_dim) and encoder.size == g.size
    report = toye4e.reconstruction_report(encoder, g, n=8, seed=0)
    assert report["encoder"] < 0.5 * report["mean code"], report


def test_toyclip_training_augmentations():
    """Washed photos lose colour but stay in range, and each kind is what it says; a shift moves content, not values."""
    rng = np.random.default_rng(0)
    photos = toyfaces.render_batch(SEEDS, "source", 32)  # [4, 3, 32, 32]
    washed = toyclip.washed_photos(photos.repeat(8, 1, 1, 1), rng)  # [32, 3, 32, 32]
    assert washed.shape == (32, 3, 32, 32) and washed.min() >= -1 and washed.max() <= 1
    spread = lambda x: (x.amax(1) - x.amin(1)).mean()  # mean channel spread: 0 for grey  # noqa: E731
    assert spread(washed) < 0.6 * spread(photos)
    paper = torch.tensor(toyfaces.PAPER_RGB).float().view(3, 1, 1) / 127.5 - 1  # [3, 1, 1]
    shading = (washed + 1) / (paper + 1)  # [32, 3, 32, 32]: the grey level, the same in all channels, on paper
    assert any(torch.allclose(s, s[:1].expand(3, -1, -1), atol=1e-4) for s in shading), "no grey shading on paper"
    assert torch.equal(toyclip.shifted(photos, 0, rng), photos)
    moved = toyclip.shifted(photos, 2, rng)  # [4, 3, 32, 32]
    for image, original in zip(moved, photos):  # the inside is the original, moved by some (dy, dx) in [-2, 2]^2
        assert any(torch.equal(image[:, 2:30, 2:30], original[:, 2 + dy:30 + dy, 2 + dx:30 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_toy_perceptual_is_lpips_without_learned_weights_on_the_toy_network():
    """demo/toynet.py's stand-in for LPIPS-VGG: the lpips package's own normalisation and spatial average (its
    lin=False distance) applied to the toy network's three trunk stages; 0 for equal images, larger for unrelated
    faces than for a face and its slightly noisy copy."""
    import lpips

    import common
    from demo import toynet

    fn = common.load_lpips("toy")
    assert isinstance(fn, toynet.ToyPerceptual) and not any(p.requires_grad for p in fn.parameters())
    faces = toyfaces.render_batch(SEEDS, "source", 32)  # [4, 3, 32, 32] in [-1, 1]
    x, y = faces[:2], faces[2:]
    expected = 0
    h_x, h_y = x, y
    for index, layer in enumerate(fn.net.trunk):
        h_x, h_y = layer(h_x), layer(h_y)
        if index in (3, 7, 11):
            diff = (lpips.normalize_tensor(h_x) - lpips.normalize_tensor(h_y)).pow(2).sum(1, keepdim=True)
            expected = expected + lpips.spatial_average(diff, keepdim=True)
    distance = fn(x, y)
    assert distance.shape == (2, 1, 1, 1)
    torch.testing.assert_close(distance, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(fn(x, x), torch.zeros(2, 1, 1, 1))
    noisy = (x + 0.02 * torch.randn_like(x)).clamp(-1, 1)
    assert (fn(x, noisy) < fn(x, y)).all()


def test_demo_runs_use_the_toy_perceptual_distance_and_real_runs_lpips_vgg(tmp_path, monkeypatch):
    import baselines
    import rssa

    monkeypatch.chdir(tmp_path)
    assert rssa.parse_args([]).lpips_net == "toy" and baselines.parse_args(["--baseline", "bsa"]).lpips_net == "toy"
    real = ["--source", "s.pt", "--target", "t"]
    assert rssa.parse_args(real).lpips_net == "vgg"
    assert baselines.parse_args([*real, "--baseline", "bsa"]).lpips_net == "vgg"
