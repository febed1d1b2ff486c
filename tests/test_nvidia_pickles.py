"""NVIDIA network pickles as sources: stylegan2-ada-pytorch / stylegan3-repo snapshots and TF StyleGAN2 pickles.

The always-running tests build pickles with NVIDIA's structure from random rosinality networks: stand-in classes
whose pickled form uses NVIDIA's module / class names and reduce protocol (torch_utils.persistence's
reconstruct hook carrying a module's __dict__; dnnlib.tflib.network.Network carrying static_kwargs, components
and TF variables), with the weight layout of NVIDIA's networks and the inverse of legacy.py's TF rules. Loading
them must give back the networks they were built from. The tests on ../shared/data/nvlabs-pickles (pickles
written by NVIDIA's own code, with its reference outputs) skip when that folder is absent.
"""

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_cli_errors, write_random_images

import checkpoints
import stylegan2
from checkpoints import CheckpointError, load_checkpoint
from stylegan2 import Discriminator, Generator

SHARED = os.path.join(ROOT, "..", "shared", "data", "nvlabs-pickles")
SHARED_NETWORKS = [
    "ada_32_map8_mbstd4_fp16", "ada_64_map2_mbstd8_cb32768", "sg3repo_stylegan2_32_map8", "ada_32_clamp4_mbstd2",
    "tf_32_config_f_map8", "tf_64_map4_mbstd8",
]
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data/nvlabs-pickles is absent")
RESAMPLE_FILTER = stylegan2.make_kernel([1, 3, 3, 1])  # NVIDIA's setup_filter([1, 3, 3, 1]): [4, 4], sum 1


# ------------------------------------------------------------------------------------------------
# stand-ins that pickle like NVIDIA's objects


def _reconstruct_persistent_obj(meta):  # never called: only its name goes into the pickle
    raise AssertionError("the loader must not call NVIDIA's reconstruct hook")


class Network:
    """Pickles as dnnlib.tflib.network.Network: NEWOBJ, then BUILD with the state dict."""

    def __init__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state


Network.__module__ = "dnnlib.tflib.network"
_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@pytest.fixture
def nvidia_modules(monkeypatch):
    """Fake modules so that pickle can name the stand-ins by NVIDIA's module paths while writing."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    network = types.ModuleType("dnnlib.tflib.network")
    network.Network = Network
    for name, module in [("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                         ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.tflib", types.ModuleType("dnnlib.tflib")),
                         ("dnnlib.tflib.network", network)]:
        monkeypatch.setitem(sys.modules, name, module)


class Persistent:
    """Pickles as NVIDIA's persistence does: _reconstruct_persistent_obj(meta), meta carrying the module's state."""

    def __init__(self, class_name, params=None, buffers=None, modules=None, **attrs):
        self.class_name = class_name
        self.state = dict(
            training=False,
            _parameters=collections.OrderedDict((k, torch.nn.Parameter(v.clone(), requires_grad=False)) for k, v in (params or {}).items()),
            _buffers=collections.OrderedDict((k, v.clone()) for k, v in (buffers or {}).items()),
            _non_persistent_buffers_set=set(),
            _modules=collections.OrderedDict(modules or {}),
            **attrs,
        )

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="# stand-in", class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


def fully_connected(weight, bias, activation, lr_multiplier=1.0):
    return Persistent("FullyConnectedLayer", {"weight": weight, "bias": bias}, activation=activation,
                      weight_gain=lr_multiplier / weight.shape[1] ** 0.5, bias_gain=lr_multiplier)


def nvidia_generator(g, w_avg):
    """A stylegan2-ada-pytorch Generator tree with g's weights (NVIDIA's parameter names and shapes)."""
    sd = g.state_dict()
    fcs = {f"fc{i}": fully_connected(sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"], "lrelu", g.lr_mlp) for i in range(g.n_mlp)}
    mapping = Persistent("MappingNetwork", buffers={"w_avg": w_avg}, modules=fcs, z_dim=g.style_dim, c_dim=0,
                         w_dim=g.style_dim, num_layers=g.n_mlp, w_avg_beta=0.995)

    def layer(ours, noise_index, up):
        return Persistent(
            "SynthesisLayer",
            {"weight": sd[f"{ours}.conv.weight"][0], "noise_strength": sd[f"{ours}.noise.weight"][0], "bias": sd[f"{ours}.activate.bias"]},
            {"resample_filter": RESAMPLE_FILTER, "noise_const": sd[f"noises.noise_{noise_index}"][0, 0]},
            {"affine": fully_connected(sd[f"{ours}.conv.modulation.weight"], sd[f"{ours}.conv.modulation.bias"], "linear")},
            up=up, use_noise=True, activation="lrelu", conv_clamp=g.conv_clamp,
        )

    def torgb(ours):
        return Persistent(
            "ToRGBLayer", {"weight": sd[f"{ours}.conv.weight"][0], "bias": sd[f"{ours}.bias"].reshape(3)}, None,
            {"affine": fully_connected(sd[f"{ours}.conv.modulation.weight"], sd[f"{ours}.conv.modulation.bias"], "linear")},
            conv_clamp=g.conv_clamp,
        )

    blocks = {"b4": Persistent("SynthesisBlock", {"const": sd["input.input"][0]}, {"resample_filter": RESAMPLE_FILTER},
                               {"conv1": layer("conv1", 0, 1), "torgb": torgb("to_rgb1")}, architecture="skip", in_channels=0)}
    for j in range(g.log_size - 2):
        blocks[f"b{8 * 2**j}"] = Persistent(
            "SynthesisBlock", None, {"resample_filter": RESAMPLE_FILTER},
            {"conv0": layer(f"convs.{2 * j}", 2 * j + 1, 2), "conv1": layer(f"convs.{2 * j + 1}", 2 * j + 2, 1), "torgb": torgb(f"to_rgbs.{j}")},
            architecture="skip",
        )
    synthesis = Persistent("SynthesisNetwork", modules=blocks, img_resolution=g.size, num_ws=g.n_latent)
    return Persistent("Generator", modules={"synthesis": synthesis, "mapping": mapping}, z_dim=g.style_dim, c_dim=0,
                      w_dim=g.style_dim, img_resolution=g.size, img_channels=3, num_ws=g.n_latent)


def nvidia_discriminator(d):
    """A stylegan2-ada-pytorch Discriminator tree (resnet) with d's weights."""
    sd = d.state_dict()

    def conv(weight, bias, activation="lrelu", clamp=d.conv_clamp):
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return Persistent("Conv2dLayer", params, {"resample_filter": RESAMPLE_FILTER}, activation=activation, conv_clamp=clamp)

    blocks = {}
    for index in range(1, len(d.convs)):
        res, ours = d.size // 2 ** (index - 1), f"convs.{index}"
        layers = {
            "conv0": conv(sd[f"{ours}.conv1.0.weight"], sd[f"{ours}.conv1.1.bias"]),
            "conv1": conv(sd[f"{ours}.conv2.1.weight"], sd[f"{ours}.conv2.2.bias"]),
            "skip": conv(sd[f"{ours}.skip.1.weight"], None, "linear", None),
        }
        if index == 1:
            layers = {"fromrgb": conv(sd["convs.0.0.weight"], sd["convs.0.1.bias"]), **layers}
        blocks[f"b{res}"] = Persistent("DiscriminatorBlock", None, {"resample_filter": RESAMPLE_FILTER}, layers, architecture="resnet")
    blocks["b4"] = Persistent("DiscriminatorEpilogue", modules={
        "mbstd": Persistent("MinibatchStdLayer", group_size=d.stddev_group, num_channels=1),
        "conv": conv(sd["final_conv.0.weight"], sd["final_conv.1.bias"]),
        "fc": fully_connected(sd["final_linear.0.weight"], sd["final_linear.0.bias"], "lrelu"),
        "out": fully_connected(sd["final_linear.1.weight"], sd["final_linear.1.bias"], "linear"),
    }, architecture="resnet", cmap_dim=0)
    return Persistent("Discriminator", modules=blocks, c_dim=0, img_resolution=d.size, img_channels=3)


def tf_variables_of_generator(g, w_avg):
    """(mapping, synthesis) TF variable lists for g: legacy.py's rules run backwards."""
    sd = {k: v.numpy() for k, v in g.state_dict().items()}
    mapping = [(f"Dense{i}/weight", sd[f"style.{i + 1}.weight"].T) for i in range(g.n_mlp)]
    mapping += [(f"Dense{i}/bias", sd[f"style.{i + 1}.bias"]) for i in range(g.n_mlp)]
    synthesis = [("4x4/Const/const", sd["input.input"])]

    def layer(theirs, ours, noise_index=None, flip=False):
        weight = sd[f"{ours}.conv.weight"][0].transpose(2, 3, 1, 0)  # [kh, kw, I, O]
        variables = [(f"{theirs}/weight", weight[::-1, ::-1] if flip else weight)]
        if noise_index is None:
            variables.append((f"{theirs}/bias", sd[f"{ours}.bias"].reshape(3)))
        else:
            variables += [(f"{theirs}/bias", sd[f"{ours}.activate.bias"]), (f"{theirs}/noise_strength", sd[f"{ours}.noise.weight"].reshape(())),
                          (f"noise{noise_index}", sd[f"noises.noise_{noise_index}"])]
        variables += [(f"{theirs}/mod_weight", sd[f"{ours}.conv.modulation.weight"].T), (f"{theirs}/mod_bias", sd[f"{ours}.conv.modulation.bias"] - 1)]
        return variables

    synthesis += layer("4x4/Conv", "conv1", 0) + layer("4x4/ToRGB", "to_rgb1")
    for j in range(g.log_size - 2):
        r = 8 * 2**j
        synthesis += layer(f"{r}x{r}/Conv0_up", f"convs.{2 * j}", 2 * j + 1, flip=True)
        synthesis += layer(f"{r}x{r}/Conv1", f"convs.{2 * j + 1}", 2 * j + 2) + layer(f"{r}x{r}/ToRGB", f"to_rgbs.{j}")
    return [("dlatent_avg", w_avg.numpy())], mapping, synthesis


def tf_network(name, static_kwargs, variables, components=None):
    return Network(dict(version=4, name=name, static_kwargs=static_kwargs, components=components or {},
                        build_module_src="# stand-in", build_func_name="G_main", variables=variables))


def tf_generator(name, g, w_avg, static_kwargs):
    own, mapping, synthesis = tf_variables_of_generator(g, w_avg)
    components = {"mapping": tf_network("G_mapping", {}, mapping), "synthesis": tf_network("G_synthesis", {}, synthesis)}
    return tf_network(name, static_kwargs, own, components)


def tf_discriminator(d, static_kwargs):
    sd = {k: v.numpy() for k, v in d.state_dict().items()}
    conv = lambda w: w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    variables = [(f"{d.size}x{d.size}/FromRGB/weight", conv(sd["convs.0.0.weight"])), (f"{d.size}x{d.size}/FromRGB/bias", sd["convs.0.1.bias"])]
    for index in range(1, len(d.convs)):
        r, ours = d.size // 2 ** (index - 1), f"convs.{index}"
        variables += [(f"{r}x{r}/Conv0/weight", conv(sd[f"{ours}.conv1.0.weight"])), (f"{r}x{r}/Conv0/bias", sd[f"{ours}.conv1.1.bias"]),
                      (f"{r}x{r}/Conv1_down/weight", conv(sd[f"{ours}.conv2.1.weight"])), (f"{r}x{r}/Conv1_down/bias", sd[f"{ours}.conv2.2.bias"]),
                      (f"{r}x{r}/Skip/weight", conv(sd[f"{ours}.skip.1.weight"]))]
    variables += [("4x4/Conv/weight", conv(sd["final_conv.0.weight"])), ("4x4/Conv/bias", sd["final_conv.1.bias"]),
                  ("4x4/Dense0/weight", sd["final_linear.0.weight"].T), ("4x4/Dense0/bias", sd["final_linear.0.bias"]),
                  ("Output/weight", sd["final_linear.1.weight"].T), ("Output/bias", sd["final_linear.1.bias"])]
    return tf_network("D", static_kwargs, variables)


def random_networks(size=16, style_dim=8, cap=8, conv_clamp=None, stddev_group=4, n_mlp=2, seed=0):
    """(g, g_ema, d, w_avg) with random weights; biases, noise strengths and w_avg perturbed from zero."""
    torch.manual_seed(seed)
    nets = [Generator(size, style_dim=style_dim, n_mlp=n_mlp, channel_cap=cap, conv_clamp=conv_clamp) for _ in range(2)]
    nets.append(Discriminator(size, channel_cap=cap, conv_clamp=conv_clamp, stddev_group=stddev_group))
    with torch.no_grad():
        for net in nets:
            for name, tensor in net.named_parameters():
                if name.endswith("bias") or name.endswith("noise.weight"):
                    tensor.add_(0.3 * torch.randn_like(tensor))
    return (*nets, torch.randn(style_dim))


def outputs(models, z, w_avg, images):
    g, g_ema, d = models["g"], models["g_ema"], models["d"]
    with torch.no_grad():
        return dict(
            g=g([z], randomize_noise=False)[0], g_ema=g_ema([z], randomize_noise=False)[0],
            trunc=g_ema([z], randomize_noise=False, truncation=0.7, truncation_latent=w_avg[None])[0],
            d=d(images),
        )


def assert_same_outputs(models, reference_models, w_avg, tol=1e-5):
    z = torch.randn(4, models["g_ema"].style_dim)
    images = torch.rand(4, 3, models["d"].size, models["d"].size) * 2 - 1
    ours, expected = outputs(models, z, w_avg, images), outputs(reference_models, z, w_avg, images)
    for key in expected:
        assert torch.allclose(ours[key], expected[key], rtol=tol, atol=tol * expected[key].abs().max()), key


def write_pickle(path, data, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return str(path)


@pytest.fixture
def ada_pickle(tmp_path, nvidia_modules):
    """(path of an ADA-style pickle with a binding conv_clamp and mbstd group 2, its rosinality networks)."""
    g, g_ema, d, w_avg = random_networks(conv_clamp=0.5, stddev_group=2)
    data = dict(training_set_kwargs=None, G=nvidia_generator(g, w_avg), D=nvidia_discriminator(d),
                G_ema=nvidia_generator(g_ema, w_avg), augment_pipe=None)
    return write_pickle(tmp_path / "ada.pkl", data), dict(g=g, g_ema=g_ema, d=d), w_avg


# ------------------------------------------------------------------------------------------------
# pickles built here


def test_pytorch_pickle_loads_with_extras(ada_pickle):
    path, reference, w_avg = ada_pickle
    models, ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["latent_avg"], w_avg)
    assert ckpt["extra_config"] == {"g": {"conv_clamp": 0.5}, "d": {"conv_clamp": 0.5, "stddev_group": 2}}
    assert models["g_ema"].conv_clamp == 0.5 and models["d"].stddev_group == 2
    assert_same_outputs(models, reference, w_avg)
    # the clamp binds: without it the outputs differ
    unclamped = Generator(16, style_dim=8, n_mlp=2, channel_cap=8)
    unclamped.load_state_dict(models["g_ema"].state_dict())
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert not torch.allclose(unclamped([z], randomize_noise=False)[0], models["g_ema"]([z], randomize_noise=False)[0])


def test_tf_pickle_round_trips(tmp_path, nvidia_modules):
    g, g_ema, d, w_avg = random_networks(size=32, n_mlp=3, stddev_group=8, seed=1)
    g_kwargs = dict(latent_size=8, dlatent_size=8, resolution=32, num_channels=3, mapping_layers=3, fmap_base=8192, fmap_max=8,
                    label_size=0, truncation_psi=0.5)
    d_kwargs = dict(resolution=32, num_channels=3, fmap_base=8192, fmap_max=8, label_size=0, mbstd_group_size=8)
    data = (tf_generator("G", g, w_avg, g_kwargs), tf_discriminator(d, d_kwargs), tf_generator("Gs", g_ema, w_avg, g_kwargs))
    path = write_pickle(tmp_path / "tf.pkl", data, protocol=2)
    models, ckpt = load_checkpoint(path)
    assert ckpt["extra_config"] == {"d": {"stddev_group": 8}} and torch.equal(ckpt["latent_avg"], w_avg)
    for name, model in dict(g=g, g_ema=g_ema, d=d).items():
        for key, tensor in model.state_dict().items():
            assert torch.allclose(models[name].state_dict()[key], tensor, atol=1e-6), (name, key)
    assert_same_outputs(models, dict(g=g, g_ema=g_ema, d=d), w_avg)

    # a TF setting legacy.py does not know, and a missing variable, are refused in one line
    data[0].state["static_kwargs"] = dict(g_kwargs, synthesis_func="G_synthesis_stylegan_revised")
    message = str(pytest.raises(CheckpointError, load_checkpoint, write_pickle(tmp_path / "config_b.pkl", data, 2)).value)
    assert "synthesis_func" in message and "configs A-D" in message
    data[0].state["static_kwargs"] = g_kwargs
    del data[2].state["components"]["synthesis"].state["variables"][3]
    message = str(pytest.raises(CheckpointError, load_checkpoint, write_pickle(tmp_path / "broken.pkl", data, 2)).value)
    assert "no variable synthesis/4x4/Conv" in message and "\n" not in message


def test_convert_reloads_and_matches_default_layout(ada_pickle, tmp_path, nvidia_modules, capsys):
    path, reference, w_avg = ada_pickle
    out = tmp_path / "converted.pt"
    checkpoints.main(["convert", path, str(out)])
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"g", "g_ema", "d", "latent_avg", "extra_config"}
    models, ckpt = load_checkpoint(str(out))
    assert models["d"].stddev_group == 2 and models["g"].conv_clamp == 0.5  # the extras come back
    assert_same_outputs(models, reference, w_avg, tol=0)

    # without extras, the file has exactly the keys and shapes of the default-config (rosinality) networks
    g, g_ema, d, w_avg = random_networks(seed=2)
    plain = write_pickle(tmp_path / "plain.pkl", dict(G=nvidia_generator(g, w_avg), D=nvidia_discriminator(d), G_ema=nvidia_generator(g_ema, w_avg)))
    checkpoints.main(["convert", plain, str(out)])
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"g", "g_ema", "d", "latent_avg"}
    for name, model in dict(g=Generator(16, style_dim=8, n_mlp=2, channel_cap=8), g_ema=g_ema, d=Discriminator(16, channel_cap=8)).items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in saved[name].items()} == expected
        model.load_state_dict(saved[name], strict=True)

    checkpoints.main(["info", path])
    info = capsys.readouterr().out
    assert "resolution: 16 px" in info and "mapping layers: 2" in info and "d: conv_clamp=0.5, stddev_group=2" in info


def test_refusals_are_one_line(tmp_path, nvidia_modules):
    g, g_ema, d, w_avg = random_networks()
    conditional = nvidia_generator(g, w_avg)
    conditional.state["c_dim"] = 5
    cases = {
        "conditional StyleGAN2 pickles are not supported": dict(G=conditional, D=nvidia_discriminator(d), G_ema=conditional),
        "StyleGAN3 (alias-free) generator, not StyleGAN2": dict(G=Persistent("Generator", modules={
            "synthesis": Persistent("SynthesisNetwork", modules={"input": Persistent("SynthesisInput")}),
            "mapping": Persistent("MappingNetwork")}, c_dim=0)),
        "not an NVIDIA StyleGAN2 network pickle": {"model": [1, 2, 3]},
    }
    for expected, data in cases.items():
        message = str(pytest.raises(CheckpointError, load_checkpoint, write_pickle(tmp_path / "case.pkl", data)).value)
        assert expected in message and "\n" not in message, message


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_code_never_runs_and_bad_files_fail_cleanly_from_cdc(ada_pickle, tmp_path):
    marker = tmp_path / "ran"
    evil = write_pickle(tmp_path / "evil.pkl", {"G": RunsShell(marker)})
    message = str(pytest.raises(CheckpointError, load_checkpoint, evil).value)
    assert "refusing to unpickle" in message and ("posix.system" in message or "nt.system" in message)
    assert not marker.exists()

    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(open(ada_pickle[0], "rb").read()[:5000])
    random_binary = tmp_path / "random.pkl"
    random_binary.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    target = write_random_images(tmp_path / "target", n=2, size=(16, 16))
    cases = [
        (["--source", evil, "--target", target], "refusing to unpickle"),
        (["--source", str(truncated), "--target", target], "truncated network pickle"),
        (["--source", str(random_binary), "--target", target], "unrecognised binary data"),
    ]
    assert_cli_errors("cdc.py", cases, ["--device", "cpu", "--iter", "1", "--out", str(tmp_path / "out")])
    assert not marker.exists()


def test_cdc_trains_from_a_pickle(ada_pickle, tmp_path):
    import cdc

    target = write_random_images(tmp_path / "target", n=3, size=(16, 16))
    path = cdc.main(["--source", ada_pickle[0], "--target", target, "--out", str(tmp_path / "run"), "--iter", "2", "--batch", "2",
                     "--feat-const-batch", "3", "--n-sample", "2", "--device", "cpu"])
    models, raw = load_checkpoint(path)
    assert set(models) == {"g", "g_ema", "d"} and raw["iter"] == 2
    # the adapted checkpoint keeps what the rosinality layout cannot say, so it reloads to the same networks
    assert raw["extra_config"] == load_checkpoint(ada_pickle[0])[1]["extra_config"]
    assert models["g_ema"].conv_clamp == 0.5 and models["d"].stddev_group == 2


# ------------------------------------------------------------------------------------------------
# pickles written by NVIDIA's code (../shared)


def relative_error(ours, expected):
    return ((ours - expected).abs().max() / expected.abs().max()).item()


@needs_shared
@pytest.mark.parametrize("name", SHARED_NETWORKS)
def test_nvidia_pickles_match_reference_outputs(name):
    models, ckpt = load_checkpoint(os.path.join(SHARED, name + ".pkl"))
    ref = torch.load(os.path.join(SHARED, name + ".ref.pt"), weights_only=True)
    g, g_ema, d = models["g"], models["g_ema"], models["d"]
    with torch.no_grad():
        ours = dict(
            ws=g_ema.style(ref["z"])[:, None].expand_as(ref["ws"]),
            img_g_ema=g_ema([ref["z"]], randomize_noise=False)[0],
            img_g=g([ref["z"]], randomize_noise=False)[0],
            img_trunc07=g_ema([ref["z"]], randomize_noise=False, truncation=0.7, truncation_latent=ckpt["latent_avg"][None])[0],
            img_mix=g_ema([ref["ws_mix"]], input_is_latent=True, randomize_noise=False)[0],
            d_real=d(ref["real"]),
            d_fake=d(ref["img_g_ema"]),
        )
    for key, value in ours.items():
        assert relative_error(value, ref[key]) < 1e-4, (key, relative_error(value, ref[key]))


@needs_shared
@pytest.mark.parametrize("name, message", [
    ("refuse_conditional", "conditional StyleGAN2 pickles are not supported"),
    ("refuse_stylegan3", "StyleGAN3 (alias-free) generator, not StyleGAN2"),
])
def test_nvidia_refusals(name, message):
    error = str(pytest.raises(CheckpointError, load_checkpoint, os.path.join(SHARED, name + ".pkl")).value)
    assert message in error and "\n" not in error


@needs_shared
def test_nvidia_pickle_converts_with_extras(tmp_path):
    source = os.path.join(SHARED, "ada_32_clamp4_mbstd2.pkl")
    out = str(tmp_path / "converted.pt")
    checkpoints.convert_checkpoint(source, out)
    original, _ = load_checkpoint(source)
    converted, ckpt = load_checkpoint(out)
    assert ckpt["extra_config"] == {"g": {"conv_clamp": 4}, "d": {"conv_clamp": 4, "stddev_group": 2}}
    z = torch.randn(4, original["g_ema"].style_dim)
    with torch.no_grad():
        assert torch.equal(converted["g_ema"]([z], randomize_noise=False)[0], original["g_ema"]([z], randomize_noise=False)[0])
        image = original["g_ema"]([z], randomize_noise=False)[0]
        assert torch.equal(converted["d"](image), original["d"](image))
