"""evaluate.py: FID / KID / IS / IC-LPIPS against direct formulas and pytorch-fid, pictures, table, errors."""

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
from conftest import assert_cli_errors, run_script
from stylegan2 import Discriminator, Generator


def write_images(folder, n, size=32, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        g = Generator(32, style_dim=16, n_mlp=2, channel_cap=16)
        d = Discriminator(32, channel_cap=16)
        path = root / f"model{seed}.pt"
        torch.save({"g": g.state_dict(), "g_ema": g.state_dict(), "d": d.state_dict()}, path)
        paths.append(str(path))
    return root, paths


def test_frechet_distance_direct_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) * 1.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    # Tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1 S2 (real, non-negative)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert abs(evaluate.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-6
    assert abs(evaluate.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_fid_statistics_equal_pytorch_fid(tmp_path):
    from pytorch_fid.fid_score import calculate_activation_statistics

    real = write_images(tmp_path / "real", 5, seed=1)  # two batches of 4 and 1
    fake = write_images(tmp_path / "fake", 3, seed=2)
    torch.manual_seed(0)
    model = evaluate.load_fid_inception("cpu", random_weights=True)
    mu_r, s_r, n = evaluate.real_statistics(real, model, 4, "cpu", str(tmp_path / "cache"), "random-2048")
    assert n == 5 and len(os.listdir(tmp_path / "cache")) == 1
    _, images = evaluate.read_folder(fake)
    mu_f, s_f = evaluate.feature_statistics(evaluate.inception_features(model, images, 4, "cpu"))
    # pytorch-fid's own pipeline (file reading, batching, features, statistics) on the same files and network
    files = lambda d: sorted(os.path.join(d, f) for f in os.listdir(d))
    for (mu, sigma), folder in (((mu_r, s_r), real), ((mu_f, s_f), fake)):
        their_mu, their_sigma = calculate_activation_statistics(files(folder), model, 50, 2048, "cpu", 0)
        assert np.allclose(mu, their_mu, atol=1e-6) and np.allclose(sigma, their_sigma, atol=1e-6)
    # the cache is reused: no network needed the second time
    again = evaluate.real_statistics(real, None, 4, "cpu", str(tmp_path / "cache"), "random-2048")
    assert np.array_equal(again[0], mu_r) and np.array_equal(again[1], s_r)


def test_fid_cli_self_is_zero_and_too_few_real_images(tmp_path, capsys):
    real = write_images(tmp_path / "real", 4)
    # --dims 64 keeps the matrix square root small; the 2048-d features are checked above
    fid = evaluate.main(["fid", "--fake", real, "--real", real, "--batch", "3", "--device", "cpu", "--random-weights",
                         "--dims", "64", "--cache-dir", str(tmp_path / "c")])
    assert abs(fid) < 1e-2
    assert capsys.readouterr().out.startswith(f"FID (random Inception) {fid:.4f}  (")  # never taken for a real FID
    one = write_images(tmp_path / "one", 1)
    with pytest.raises(common.UserError, match="at least 2 real images"):
        evaluate.main(["fid", "--fake", real, "--real", one, "--device", "cpu", "--random-weights", "--cache-dir", str(tmp_path / "c")])


def test_fid_of_a_checkpoint(ckpts, tmp_path):
    root, paths = ckpts
    real = write_images(tmp_path / "real", 4)
    fid = evaluate.main(["fid", "--ckpt", paths[0], "--real", real, "--n", "6", "--batch", "3", "--device", "cpu",
                         "--random-weights", "--dims", "64", "--cache-dir", str(tmp_path / "c")])
    assert np.isfinite(fid) and fid > 0


def test_kid_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    y = rng.normal(size=(30, 8)) + 1.0
    x2 = rng.normal(size=(30, 8))
    same, _ = evaluate.kernel_inception_distance(x2, x, n_subsets=5, subset_size=30)
    shifted, _ = evaluate.kernel_inception_distance(y, x, n_subsets=5, subset_size=30)
    # direct unbiased MMD^2 on the full sets (subset size = set size: every subset is the whole set)
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3
    m = 30
    direct = ((k(x, x).sum() - np.trace(k(x, x))) + (k(y, y).sum() - np.trace(k(y, y)))) / (m * (m - 1)) - 2 * k(x, y).mean()
    assert abs(shifted - direct) < 1e-9 and shifted > 0
    assert abs(same) < shifted / 10  # two samples of one distribution: near zero


def test_inception_score_formula():
    uniform = np.full((20, 10), 0.1)
    assert evaluate.inception_score(uniform, splits=2) == pytest.approx((1.0, 0.0))
    one_hot = np.eye(10)[np.arange(20) % 10] * (1 - 1e-9) + 1e-10
    mean, std = evaluate.inception_score(one_hot, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-5)  # confident and uniform over 10 classes: IS = 10
    model = evaluate.load_is_inception("cpu", random_weights=True)
    probs = evaluate.inception_probabilities(model, [torch.randint(0, 256, (3, 75, 75), dtype=torch.uint8) for _ in range(4)], 2, "cpu")
    assert probs.shape == (4, 1000) and np.allclose(probs.sum(1), 1)
    with pytest.raises(common.UserError, match="at least 75 px"):
        evaluate.inception_probabilities(model, [torch.zeros(3, 32, 32, dtype=torch.uint8)], 1, "cpu")


def test_lpips_from_features_equals_lpips():
    model = common.load_lpips("vgg", random_backbone=True)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    ours = evaluate.lpips_from_features(model, evaluate.lpips_features(model, x), evaluate.lpips_features(model, y))
    assert torch.allclose(ours, model(x, y).flatten(), atol=1e-6)


def test_intra_cluster_lpips_hand_built():
    model = common.load_lpips("vgg", random_backbone=True)
    rng = np.random.default_rng(0)
    centers = torch.from_numpy(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    # copies of centre 0 (x4), centre 2 (x3) and centre 1 (x1): each must be assigned to its own centre
    generated = centers[[0, 0, 2, 0, 2, 1, 0, 2]]
    assignment = evaluate.assign_clusters(model, generated, centers, 3, "cpu", size=32)
    assert assignment.tolist() == [0, 0, 2, 0, 2, 1, 0, 2]
    mean, std, per_cluster, counts = evaluate.intra_cluster_lpips(model, generated, assignment, 3, "cpu", size=32)
    assert counts == [4, 1, 3]
    assert per_cluster[0] == pytest.approx(0, abs=1e-6) and per_cluster[2] == pytest.approx(0, abs=1e-6)
    assert np.isnan(per_cluster[1])  # fewer than 2 members: reported, excluded from the mean
    assert mean == pytest.approx(0, abs=1e-6)
    # distinct members: the mean over all pairs i < j, computed directly
    distinct = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    mean, _, per, counts = evaluate.intra_cluster_lpips(model, distinct, torch.zeros(4, dtype=torch.long), 1, "cpu", size=32)
    x = distinct.float() / 127.5 - 1
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = np.mean([model(x[i : i + 1], x[j : j + 1]).item() for i, j in pairs])
    assert mean == pytest.approx(direct, rel=1e-5)
    # the member cap keeps `cluster_size` members, chosen by the seed
    capped = evaluate.intra_cluster_lpips(model, distinct, torch.zeros(4, dtype=torch.long), 1, "cpu", cluster_size=2, seed=3, size=32)
    assert capped[3] == [4] and capped[0] > 0


@pytest.fixture
def squeeze_lpips(monkeypatch):
    """LPIPS's SqueezeNet backbone wherever evaluate.py asks for VGG (tests/ddp_runs.py says why): the commands'
    plumbing under test does not depend on the backbone."""
    from ddp_runs import squeezenet_lpips

    monkeypatch.setattr(common, "load_lpips", squeezenet_lpips(common.load_lpips))


def test_iclpips_cli(ckpts, tmp_path, squeeze_lpips):
    root, paths = ckpts
    train = write_images(tmp_path / "train", 3, size=40)
    mean, std, counts = evaluate.main(["iclpips", "--ckpt", paths[0], "--train", train, "--n", "6", "--batch", "6",
                                       "--device", "cpu", "--random-weights"])
    assert sum(counts) == 6 and len(counts) == 3 and (np.isnan(mean) or mean >= 0)


def test_compare_table_and_csv(ckpts, tmp_path, squeeze_lpips, capsys):
    root, paths = ckpts
    train = write_images(tmp_path / "train", 2)
    out_csv = tmp_path / "results.csv"
    real = write_images(tmp_path / "real", 4)
    rows = evaluate.main(["compare", "--ckpt", *paths, "--names", "cdc", "c3", "--train", train, "--real", real, "--dims", "64",
                          "--cache-dir", str(tmp_path / "c"),
                          "--n", "4", "--n-lpips", "4", "--batch", "4", "--splits", "2", "--resize", "--device", "cpu",
                          "--random-weights", "--csv", str(out_csv)])
    table = evaluate.markdown_table(rows).splitlines()
    assert table[0] == "| method | FID | IC-LPIPS | IS |" and table[1] == "|---|---|---|---|"
    assert table[2].startswith("| cdc | ") and table[3].startswith("| c3 | ") and " ± " in table[2]
    # what the command printed and wrote: random networks' numbers say so in their column headers
    assert "| method | FID (random Inception) | IC-LPIPS (random VGG) | IS (random Inception) |" in capsys.readouterr().out
    with open(out_csv) as f:
        read = list(csv.DictReader(f))
    assert [r["method"] for r in read] == ["cdc", "c3"] and float(read[0]["is (random Inception)"]) == pytest.approx(rows[0]["is"])
    assert set(read[0]) == {"method", "fid (random Inception)", "ic_lpips (random VGG)", "ic_lpips_std (random VGG)",
                            "small_clusters (random VGG)", "is (random Inception)", "is_std (random Inception)"}
    assert rows[0]["fid"] != rows[1]["fid"]
    full = [{"method": "cdc", "fid": 45.678, "ic_lpips": 0.4531, "ic_lpips_std": 0.0212, "is": 2.5, "is_std": 0.1}]
    assert evaluate.markdown_table(full).splitlines() == [
        "| method | FID | IC-LPIPS | IS |", "|---|---|---|---|", "| cdc | 45.68 | 0.4531 ± 0.0212 | 2.500 ± 0.100 |"
    ]


def test_pictures(ckpts, tmp_path):
    root, paths = ckpts
    grid = tmp_path / "grid.png"
    evaluate.main(["grid", "--source", paths[0], "--ckpt", paths[1], paths[0], "--n", "3", "--truncation", "0.7",
                   "--device", "cpu", "--out", str(grid)])
    image = np.asarray(Image.open(grid))
    assert image.shape == (3 * 34 + 2, 3 * 34 + 2, 3)  # 3 rows (source + 2) of 3 images, 2-px padding
    # rows 1 and 3 are the same model with the same z and noise: identical pixels
    assert np.array_equal(image[2:34], image[70:102])
    gif = tmp_path / "interp.gif"
    evaluate.main(["interpolate", "--source", paths[0], "--ckpt", paths[1], "--keyframes", "2", "--steps", "3",
                   "--device", "cpu", "--out", str(gif)])
    frames = Image.open(gif)
    assert frames.size == (64, 32) and frames.n_frames == 6
    out = tmp_path / "export"
    evaluate.main(["export", "--ckpt", paths[0], "--n", "5", "--batch", "2", "--device", "cpu", "--out", str(out)])
    assert sorted(os.listdir(out)) == [f"{k:06d}.png" for k in range(5)]
    first = np.asarray(Image.open(out / "000000.png"))
    assert first.shape == (32, 32, 3)


def test_generation_is_deterministic_and_quantised_like_png(ckpts):
    root, paths = ckpts
    g = evaluate.load_generator(paths[0], "cpu")
    z = evaluate.latents(4, 16, 7, "cpu")
    torch.manual_seed(1)
    a = evaluate.generate(g, z, 2)
    torch.manual_seed(1)
    b = evaluate.generate(g, z, 4)
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0])
    assert evaluate.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_bad_inputs(ckpts, tmp_path):
    root, paths = ckpts

    code, _, err = run_script("evaluate.py", ["fid", "--ckpt", paths[0], "--real", str(tmp_path / "missing"), "--device", "cpu", "--random-weights"])
    assert code == 2 and err.strip() == f"error: target not found: {tmp_path / 'missing'}"
    # the same one-line errors, in this process (run_main prints them as above)
    from checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        evaluate.main(["grid", "--source", str(tmp_path / "nope.pt"), "--ckpt", paths[0], "--device", "cpu"])
    with pytest.raises(common.UserError, match="names"):
        evaluate.main(["compare", "--ckpt", *paths, "--names", "only-one", "--no-is", "--device", "cpu"])
    # a missing folder fails before any network is built (fid, and kid through real_and_generated_features)
    def no_network(*args, **kwargs):
        raise AssertionError("the Inception network was built before the inputs were checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "load_fid_inception", no_network)
        for command in ("fid", "kid"):
            with pytest.raises(common.UserError, match="target not found"):
                evaluate.main([command, "--ckpt", paths[0], "--real", str(tmp_path / "missing"), "--device", "cpu"])
        with pytest.raises(common.UserError, match="target not found"):
            evaluate.main(["fid", "--fake", str(tmp_path / "missing"), "--real", write_images(tmp_path / "real", 2), "--device", "cpu"])


def test_every_option_says_what_it_is_and_its_default():
    import argparse

    parser = evaluate.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {*evaluate.SHARDED_COMMANDS, "grid", "interpolate", "export", "invert", "translate", "edit"}
    for command, subparser in commands.items():
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            option = f"{command} {action.option_strings[0]}"
            assert action.help and action.help.strip(), option
            if not action.required and action.default is not None:  # flags too (default False)
                assert "default" in action.help, (option, action.help)


def test_missing_inception_weights_name_the_command(monkeypatch, tmp_path):
    from pytorch_fid import inception as fid

    def offline(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fid, "load_state_dict_from_url", offline)
    real = write_images(tmp_path / "real", 2)  # inputs that exist: the missing weights are the first error
    for argv, command in ((["kid", "--ckpt", "x.pt", "--real", real], "evaluate.py kid needs"),
                          (["compare", "--ckpt", "x.pt", "--real", real], "evaluate.py compare (FID column) needs"),
                          (["fid", "--ckpt", "x.pt", "--real", real], "evaluate.py fid needs")):
        with pytest.raises(common.UserError) as info:
            evaluate.main([*argv, "--device", "cpu"])
        message = str(info.value)
        assert message.startswith(command) and "pt_inception-2015-12-05" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------
# density and coverage, pairs


def direct_density_coverage(real, fake, k):
    """Naeem et al.'s definitions, one sample at a time."""
    dist = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))
    radii = [sorted(dist(x, other) for j, other in enumerate(real) if j != i)[k - 1] for i, x in enumerate(real)]
    density = sum(dist(y, x) < r for y in fake for x, r in zip(real, radii)) / (k * len(fake))
    coverage = np.mean([any(dist(y, x) < r for y in fake) for x, r in zip(real, radii)])
    return density, coverage


def test_density_coverage_against_the_definitions():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 4)), rng.normal(size=(15, 4)) * 1.3 + 0.4
    for k in (1, 3, 5):
        assert evaluate.density_coverage(real, fake, k) == pytest.approx(direct_density_coverage(real, fake, k))
    density, coverage = evaluate.density_coverage(real, real.copy(), 5)
    assert coverage == 1 and density == pytest.approx(direct_density_coverage(real, real, 5)[0])
    assert evaluate.density_coverage(real, fake + 100, 5) == (0, 0)  # far from every real sample
    with pytest.raises(common.UserError, match="more than 5 real"):
        evaluate.density_coverage(real[:5], fake)


@pytest.fixture(scope="module")
def random_networks_once():
    """The random LPIPS and Inception networks built once for this module's tests of the new subcommands
    (building them is most of these tests' time); every command of a test then sees the same networks."""
    import functools

    inception = functools.cache(evaluate.load_fid_inception)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_lpips", functools.cache(common.load_lpips))
        patch.setattr(evaluate, "load_fid_inception",
                      lambda device, random_weights=False, dims=2048, command="fid": inception(device, random_weights, dims))
        yield


def test_pair_and_compare_columns(ckpts, tmp_path, random_networks_once, capsys):
    root, paths = ckpts
    # the cosine of ArcFace embeddings, read from a state dict in model_ir_se50.pth's layout
    identity = evaluate.IdentityNet().state_dict()
    assert identity["input_layer.0.weight"].shape == (64, 3, 3, 3) and identity["output_layer.3.weight"].shape == (512, 25088)
    assert "body.23.res_layer.5.fc2.weight" in identity and "body.3.shortcut_layer.1.running_var" in identity
    torch.save(identity, tmp_path / "model_ir_se50.pth")
    base = ["--n", "3", "--batch", "3", "--device", "cpu", "--random-weights"]
    other = evaluate.main(["pair", "--a", paths[0], "--b", paths[1], "--identity", str(tmp_path / "model_ir_se50.pth"), *base])
    assert other["pair_lpips"] > 0 and other["pair_mse"] > 0 and -1 <= other["pair_cosine"] < 1
    # the LPIPS VGG is random; the ArcFace weights were given, so the cosine has no label
    assert capsys.readouterr().out.startswith(f"LPIPS (random VGG) {other['pair_lpips']:.4f}  MSE {other['pair_mse']:.5f}  "
                                              f"cosine {other['pair_cosine']:.4f}  (")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(common.UserError, match="not an ArcFace IR-SE50"):
        evaluate.main(["pair", "--a", paths[0], "--b", paths[1], "--identity", str(tmp_path / "other.pth"), *base])
    # the same z and noise: a generator paired with itself gives identical images
    g = evaluate.load_generator(paths[0], "cpu")
    a, b = evaluate.paired_samples(g, g, 3, 2, 0, "cpu")
    assert torch.equal(a, b) and a.shape == (3, 3, 32, 32)
    real = write_images(tmp_path / "real", 4)
    rows = evaluate.main(["compare", "--ckpt", *paths, "--names", "cdc", "c3", "--real", real, "--dims", "64", "--no-is",
                          "--density-coverage", "--k", "2", "--pair-with", paths[0], "--cache-dir", str(tmp_path / "c"),
                          *base, "--csv", str(tmp_path / "r.csv")])
    # paired with itself: identical images; with the other model: what `pair` measured (Inception 64-d cosine here)
    assert rows[0]["pair_lpips"] == 0 and rows[0]["pair_mse"] == 0 and rows[0]["pair_cosine"] == pytest.approx(1)
    assert rows[1]["pair_lpips"] == pytest.approx(other["pair_lpips"]) and rows[1]["pair_mse"] == pytest.approx(other["pair_mse"])
    assert all(0 <= r["coverage"] <= 1 and r["density"] >= 0 for r in rows)
    assert evaluate.markdown_table(rows).splitlines()[0] == \
        "| method | FID | density | coverage | pair LPIPS | pair MSE | pair cosine |"
    assert ("| method | FID (random Inception) | density (random Inception) | coverage (random Inception) | "
            "pair LPIPS (random VGG) | pair MSE | pair cosine (random Inception) |") in capsys.readouterr().out.splitlines()


# ------------------------------------------------------------------------------------------------
# real images: invert, translate, edit


@pytest.fixture(scope="module")
def photo_setup(tmp_path_factory, random_networks_once):
    """(root, source, plain adapted checkpoint, RSSA-like checkpoint with codes and blend, photo folder, codes file)."""
    from conftest import write_random_images, write_tiny_source

    root = tmp_path_factory.mktemp("photos")
    source = write_tiny_source(root / "source.pt")
    adapted = write_tiny_source(root / "adapted.pt", seed=1)
    rssa_like = root / "rssa.pt"
    state = torch.load(adapted, weights_only=False)
    torch.save({"g_ema": state["g_ema"], "latent_codes": torch.randn(3, 8, 16), "blend": torch.linspace(0, 0.8, 8)}, rssa_like)
    photos = write_random_images(root / "photos", n=2, size=(40, 48))
    result = evaluate.main(["invert", "--source", source, "--images", photos, "--steps", "15", "--out", str(root / "inv"),
                            "--device", "cpu", "--random-weights"])
    return root, source, adapted, str(rssa_like), photos, str(root / "inv" / "codes.pt"), result


def test_invert_writes_codes_and_beats_a_random_code(photo_setup):
    root, source, _, _, _, codes_path, result = photo_setup
    codes = torch.load(codes_path, weights_only=True)
    assert sorted(codes) == ["0.png", "1.png"] and all(c.shape == (8, 16) for c in codes.values())
    assert torch.equal(codes["1.png"], result["codes"][1])
    assert np.asarray(Image.open(root / "inv" / "reconstruction.png")).shape[0] == 2 * 34 + 2  # photos | reconstructions
    assert torch.all(result["lpips"] < result["lpips_random"]), (result["lpips"], result["lpips_random"])


def test_translate_and_edit_render_the_same_code_identically(photo_setup, tmp_path):
    from rssa import CompressedGenerator, compress_latents

    root, source, adapted, rssa_like, photos, codes_path, _ = photo_setup
    shared = ["--source", source, "--ckpt", adapted, rssa_like, "--names", "cdc", "rssa", "--images", photos,
              "--codes", codes_path, "--device", "cpu"]
    columns = evaluate.main(["translate", *shared, "--out", str(tmp_path / "t")])
    grid = np.asarray(Image.open(tmp_path / "t" / "translation.png"))
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)  # a row per photo: photo, source, cdc, rssa
    assert np.array_equal(grid[2:34, 2:34], columns[0][0].permute(1, 2, 0).numpy())  # the photo, resized and cropped
    # the RSSA column renders P(w), through its compression, with the source's noise
    g = evaluate.load_generator(rssa_like, "cpu")
    assert isinstance(g, CompressedGenerator)
    code = torch.load(codes_path, weights_only=True)["0.png"][None]  # [1, L, D]
    noise = evaluate.fixed_noise(evaluate.load_source(source, "cpu"))
    with torch.no_grad():
        expected = evaluate.to_uint8(g.g([compress_latents(code, g.projectors, g.blend)], input_is_latent=True, noise=noise)[0])
    assert torch.equal(columns[3][0], expected[0])
    strengths = ["0", "1", "2", "3"]
    strips = evaluate.main(["edit", *shared, "--direction", "pc0", "--strength", *strengths, "--pca-samples", "2000",
                            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "e")])
    for photo, strip in zip(("0", "1"), strips):
        rows = strip.view(3, len(strengths), 3, 32, 32)  # [models, strengths, 3, H, W]: source, cdc, rssa
        saved = np.asarray(Image.open(tmp_path / "e" / f"{photo}_edit.png"))
        assert np.array_equal(saved[2:34, 2:34], rows[0, 0].permute(1, 2, 0).numpy())
        for m, name in enumerate(("source", "cdc", "rssa")):
            translated = np.asarray(Image.open(tmp_path / "t" / f"{photo}_{name}.png"))
            assert np.array_equal(rows[m, 0].permute(1, 2, 0).numpy(), translated)  # strength 0 = the translation
            # the image moves further from the unedited one with every step along pc0
            change = [(rows[m, s].float() - rows[m, 0].float()).abs().mean().item() for s in range(len(strengths))]
            assert all(a < b for a, b in zip(change, change[1:])), (name, change)


def test_translate_inverts_when_no_codes_are_given(photo_setup, tmp_path):
    root, source, adapted, _, photos, _, _ = photo_setup
    evaluate.main(["translate", "--source", source, "--ckpt", adapted, "--images", photos, "--steps", "1",
                   "--out", str(tmp_path), "--device", "cpu", "--random-weights"])
    assert sorted(torch.load(tmp_path / "codes.pt", weights_only=True)) == ["0.png", "1.png"]
    assert (tmp_path / "0_adapted.png").exists() and (tmp_path / "1_source.png").exists()


def test_translate_ctrl_c_keeps_the_finished_photos(photo_setup, tmp_path, monkeypatch, capsys):
    import runtime

    root, source, adapted, _, photos, codes_path, _ = photo_setup
    write_png = evaluate.write_png

    def half_written(f):
        f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    def ctrl_c_in_the_second_photo(path, image):
        if os.path.basename(path).startswith("1_"):
            evaluate.write_atomically(path, half_written)
        write_png(path, image)

    monkeypatch.setattr(evaluate, "write_png", ctrl_c_in_the_second_photo)
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as exit:  # the script's entry point
        runtime.run_main(evaluate.main, ["translate", "--source", source, "--ckpt", adapted, "--images", photos,
                                         "--codes", codes_path, "--device", "cpu", "--out", str(out)])
    assert exit.value.code == 130
    assert capsys.readouterr().err == f"interrupted: 1 of 2 photos written to {out}\n"  # one line, no traceback
    # the first photo's pictures stay; nothing of the second, not even a temporary file
    assert sorted(os.listdir(out)) == ["0_adapted.png", "0_source.png"]
    assert np.asarray(Image.open(out / "0_adapted.png")).shape == (32, 32, 3)


def test_edit_directions_layers_and_ganspace(photo_setup, tmp_path):
    root, source, *_ = photo_setup
    g = evaluate.load_source(source, "cpu")
    assert evaluate.parse_layers("all", 8) == list(range(8)) and evaluate.parse_layers("coarse", 8) == [0, 1, 2, 3]
    assert evaluate.parse_layers("middle", 14) == [4, 5, 6, 7] and evaluate.parse_layers("fine", 14) == list(range(8, 14))
    assert evaluate.parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert evaluate.model_names(["runs/cdc-x/checkpoints/000500.pt", "c3.pt"]) == ["cdc-x", "c3"]
    for paths, names, message in ((["a.pt"], ["a", "b"], "2 names for 1"), (["r/a.pt", "s/a.pt"], None, "not distinct")):
        with pytest.raises(common.UserError, match=message):
            evaluate.model_names(paths, names)
    for spec, message in (("fine", "none of them fine"), ("3-9", "0-7"), ("a-b", "use all")):
        with pytest.raises(common.UserError, match=message):
            evaluate.parse_layers(spec, 8)
    # a file direction moves only the chosen slots, by strength times the direction
    np.save(tmp_path / "boundary.npy", np.ones((1, 16), dtype=np.float32))
    args = evaluate.parse_args(["edit", "--source", source, "--ckpt", source, "--images", ".", "--direction", "pc0",
                                "--pca-samples", "3000", "--cache-dir", str(tmp_path / "cache")])
    direction, unit = evaluate.edit_direction(str(tmp_path / "boundary.npy"), g, args, "cpu")
    assert direction.shape == (8, 16) and "boundary.npy" in unit
    code = torch.randn(8, 16)
    edited = evaluate.edited_codes(code, direction, [0.0, 2.0], [0, 1])
    assert torch.equal(edited[0], code)
    assert torch.equal(edited[1, :2], code[:2] + 2) and torch.equal(edited[1, 2:], code[2:])
    # GANSpace: orthonormal axes by decreasing variance, the variance of the samples along each; cached
    components, stdevs = evaluate.ganspace_components(g, source, 3000, "cpu", str(tmp_path / "cache"))
    assert torch.allclose(components @ components.T, torch.eye(16), atol=1e-5) and torch.all(stdevs[:-1] >= stdevs[1:])
    with torch.no_grad():
        w = g.style(torch.randn(3000, 16, generator=torch.Generator().manual_seed(0)))  # the same samples
    assert torch.allclose((w @ components.T).std(0), stdevs, rtol=1e-3)
    with pytest.raises(common.UserError, match="16 principal components"):
        evaluate.edit_direction("pc16", g, args, "cpu")
    pc1, _ = evaluate.edit_direction("pc1", g, args, "cpu")
    assert torch.allclose(pc1[3], stdevs[1] * components[1])
    assert len(os.listdir(tmp_path / "cache")) == 1
    again = evaluate.ganspace_components(g, source, 3000, "cpu", str(tmp_path / "cache"))
    assert torch.equal(again[0], components)


def test_photo_commands_one_line_errors(photo_setup, tmp_path):
    root, source, adapted, _, photos, codes_path, _ = photo_setup
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save(torch.zeros(3, 16), tmp_path / "wrong.pt")
    base = ["--source", source, "--ckpt", adapted, "--codes", codes_path, "--device", "cpu", "--out", str(tmp_path / "o")]
    cases = [
        (["edit", "--images", photos, "--direction", str(tmp_path / "missing.npy")], "direction file not found"),
        (["edit", "--images", photos, "--direction", str(tmp_path / "wrong.pt")], "has shape (3, 16); this source needs [16]"),
        (["translate", "--images", str(empty)], "--images: no images"),
    ]
    assert_cli_errors("evaluate.py", cases, base)
