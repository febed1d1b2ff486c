"""StyleGAN2 checkpoint files: reading, converting, describing (`python checkpoints.py convert|info`).

- `load_checkpoint(path)`: reads rosinality/CDC checkpoints safely (`weights_only=True`), strips `module.`,
  infers the architecture from tensor shapes and loads strictly into stylegan2.py's networks, with one-line
  errors (`CheckpointError`). It also reads NVIDIA network pickles (stylegan2-ada-pytorch, stylegan3's StyleGAN2,
  TensorFlow StyleGAN2) with G, D and G_ema, through a restricted unpickler that runs no code from the file, and
  maps them to rosinality's layout; NVIDIA options rosinality lacks (conv_clamp, the D's stddev group, the
  mapping's lr multiplier) are constructor arguments stored under "extra_config".
- `save_atomically(state, path)`: torch.save through a temporary file and a rename (`write_atomically`, which
  pictures use too).
- `python checkpoints.py convert IN OUT` writes any readable checkpoint as a rosinality .pt; `python
  checkpoints.py info PATH` prints the configuration it infers. (These two commands were `python stylegan2.py
  convert|info` before the file formats moved here.)
"""

import argparse

import torch

from stylegan2 import Discriminator, Generator, _log2_size, make_kernel


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


# ------------------------------------------------------------------------------------------------
# Checkpoints in rosinality's format



TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's magic number (pre-1.6 files)
IMAGE_SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
]


def _first_line(error):
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:120]


def _check_path(path):
    import os

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")


def _looks_like_text(head):
    printable = sum(32 <= b < 127 or b in (9, 10, 13) or b >= 128 for b in head)
    return b"\x00" not in head and printable >= 0.95 * len(head)


def sniff_file(path):
    """What the first bytes of a checkpoint file say it is: (kind, description).

    kind: "torch" (a torch.save zip or legacy file), "pickle" (a plain pickle, e.g. an NVIDIA network pickle),
    "broken" (a torch file that cannot be read; description is the whole reason) or "other" (description says
    what the file is instead: an image, a text or HTML file, a zip archive, empty, unknown binary).
    """
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "other", "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            if b"data.pkl" in head:
                return "broken", "a truncated or damaged PyTorch checkpoint (its zip directory is missing; copy or download it again)"
            return "other", "a truncated or damaged zip archive"
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return "torch", "a PyTorch checkpoint"
        return "other", "a zip archive without data.pkl"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "torch", "a legacy PyTorch checkpoint"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", "a Python pickle"
    for signature, description in IMAGE_SIGNATURES:
        if head.startswith(signature):
            return "other", description
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "other", "a WebP image"
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":
        return "other", "a BMP image"
    if _looks_like_text(head):
        text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
        if text.lower().startswith(("<!doctype html", "<html", "<head")) or "<html" in text.lower():
            return "other", "an HTML page (a failed download?)"
        return "other", f"a text file (starting {text[:24]!r})"
    return "other", f"unrecognised binary data (starting {head[:6].hex(' ')})"


def read_checkpoint(path):
    """torch.load a checkpoint without unpickling arbitrary objects; one-line CheckpointError on failure.

    Only tensors, containers and plain values load, plus argparse.Namespace (rosinality stores its
    training arguments as one under "args"). A file that is not a torch file is named by its first bytes.
    """
    import pickle
    import re
    import warnings

    _check_path(path)
    kind, what = sniff_file(path)
    if kind == "broken":
        raise CheckpointError(f"{path} is {what}")
    if kind == "pickle":
        raise CheckpointError(f"{path} is a plain Python pickle, not a PyTorch checkpoint (NVIDIA network pickles load only as --source)")
    if kind == "other":
        raise CheckpointError(f"{path} is {what}, not a PyTorch checkpoint (.pt) or network pickle (.pkl)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            culprit = found.group(1) if found else "an object torch does not allow"
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors ({culprit}); refusing to unpickle it"
            ) from None
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch checkpoint ({_first_line(error)})") from None
    except Exception as error:  # zip/EOF errors inside a file that starts like a torch checkpoint
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch checkpoint ({_first_line(error)})") from None


def strip_module_prefix(state_dict):
    """Remove the leading "module." that nn.DataParallel adds (CDC's saved g_ema) from every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _indices(state_dict, prefix, suffix):
    found = set()
    for key in state_dict:
        if key.startswith(prefix) and key.endswith(suffix):
            middle = key[len(prefix) : len(key) - len(suffix)]
            if middle.isdigit():
                found.add(int(middle))
    return found


def _shape_mismatch(model_cls, kwargs, state_dict):
    """None if state_dict has exactly the keys and shapes of model_cls(**kwargs), else a short description."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_cls(**kwargs).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
        return ", ".join(parts)
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            return f"{key} is {list(state_dict[key].shape)}, expected {list(shape)}"
    return None


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _channel_options(top_channels):
    # the cap is the 4x4 width whenever that is below rosinality's 512; try channel_multiplier 2 first
    cap = None if top_channels == 512 else top_channels
    return [(cm, cap) for cm in (2, 1, 4, 8)]


def infer_generator_config(state_dict, name="g"):
    """Generator kwargs (size, style_dim, n_mlp, channel_multiplier, channel_cap) from tensor shapes."""
    state_dict = strip_module_prefix(state_dict)
    n_rgbs = len(_indices(state_dict, "to_rgbs.", ".conv.weight"))
    mlp = _indices(state_dict, "style.", ".weight")
    if "input.input" not in state_dict or "style.1.weight" not in state_dict or not mlp:
        raise CheckpointError(f"'{name}' is not a StyleGAN2 generator state dict (no input.input / style.1.weight)")
    top_channels = state_dict["input.input"].shape[1]
    base = dict(size=2 ** (n_rgbs + 2), style_dim=state_dict["style.1.weight"].shape[1], n_mlp=max(mlp))
    if not 8 <= base["size"] <= 1024 or top_channels > 512:
        raise CheckpointError(f"'{name}' matches no StyleGAN2 generator configuration")
    problem = None
    for cm, cap in _channel_options(top_channels):
        kwargs = dict(base, channel_multiplier=cm, channel_cap=cap)
        problem = _shape_mismatch(Generator, kwargs, state_dict)
        if problem is None:
            return kwargs
    raise CheckpointError(f"'{name}' matches no StyleGAN2 generator configuration ({base['size']} px: {problem})")


def infer_discriminator_config(state_dict, name="d"):
    """Discriminator kwargs (size, channel_multiplier, channel_cap) from tensor shapes."""
    state_dict = strip_module_prefix(state_dict)
    blocks = _indices(state_dict, "convs.", ".conv1.0.weight")
    if "convs.0.0.weight" not in state_dict or "final_conv.1.bias" not in state_dict or not blocks:
        raise CheckpointError(f"'{name}' is not a StyleGAN2 discriminator state dict (no convs.0.0.weight / final_conv)")
    size = 2 ** (len(blocks) + 2)
    top_channels = state_dict["final_conv.1.bias"].shape[0]
    if not 8 <= size <= 1024 or top_channels > 512:
        raise CheckpointError(f"'{name}' matches no StyleGAN2 discriminator configuration")
    problem = None
    for cm, cap in _channel_options(top_channels):
        kwargs = dict(size=size, channel_multiplier=cm, channel_cap=cap)
        problem = _shape_mismatch(Discriminator, kwargs, state_dict)
        if problem is None:
            return kwargs
    raise CheckpointError(f"'{name}' matches no StyleGAN2 discriminator configuration ({size} px: {problem})")


# ------------------------------------------------------------------------------------------------
# NVIDIA network pickles (stylegan2-ada-pytorch, stylegan3's networks_stylegan2, TensorFlow StyleGAN2)
#
# Read with a restricted unpickler: NVIDIA's persistence hook, dnnlib.EasyDict and the TF Network class map to
# inert stand-ins that keep the pickled state (the class source code inside the pickle is never executed);
# tensors, numpy arrays and plain containers rebuild as data; every other global is refused.


class NvidiaObject:
    """Stand-in for an object pickled by NVIDIA's torch_utils.persistence (a network module): its class name
    and pickled __dict__ (_parameters, _buffers, _modules and plain attributes)."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    @classmethod
    def from_meta(cls, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise ValueError("a persistent object without class state")
        return cls(str(meta.get("class_name")), meta["state"])

    def attr(self, name, default=None):
        return self.state.get(name, default)

    def child(self, name):
        module = (self.state.get("_modules") or {}).get(name)
        return module if isinstance(module, NvidiaObject) else None

    def walk(self):
        yield self
        for module in (self.state.get("_modules") or {}).values():
            if isinstance(module, NvidiaObject):
                yield from module.walk()

    def tensors(self, prefix=""):
        """{dotted name: tensor} of all parameters and buffers, as NVIDIA's state_dict() would name them."""
        found = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if torch.is_tensor(value):
                    found[prefix + name] = value
        for name, module in (self.state.get("_modules") or {}).items():
            if isinstance(module, NvidiaObject):
                found.update(module.tensors(f"{prefix}{name}."))
        return found


class TFNetwork:
    """Stand-in for dnnlib.tflib.network.Network: keeps its pickled state (version, static_kwargs, components,
    variables)."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ValueError("a TensorFlow network without state")
        self.state = state

    def variables(self, prefix=""):
        """{TF variable name: numpy array}, components' variables prefixed with 'component/'."""
        found = {prefix + name: value for name, value in self.state.get("variables", [])}
        for name, component in self.state.get("components", {}).items():
            if isinstance(component, TFNetwork):
                found.update(component.variables(f"{prefix}{name}/"))
        return found


class _EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: a plain dict."""


class _RefusedGlobal(Exception):
    pass


def _load_storage(data):
    """torch.storage._load_from_bytes, but reading the embedded torch file with weights_only=True."""
    import io

    storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ValueError("tensor data is not a torch storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ValueError("tensor data is not a torch storage")
    return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    if not torch.is_tensor(data):
        raise ValueError("a parameter without tensor data")
    return data


def _latin1_bytes(text, encoding="utf-8"):
    """_codecs.encode as protocol-2 pickles use it for bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"unexpected text encoding {encoding!r}")
    return text.encode("latin-1")


def _network_pickle_globals():
    import collections

    import numpy as np

    reconstruct_array = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, under numpy.core or numpy._core
    scalar = np.float32(0).__reduce__()[0]
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): NvidiaObject.from_meta,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("dnnlib", "EasyDict"): _EasyDict,
        ("dnnlib.tflib.network", "Network"): TFNetwork,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_bytes,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct_array
        allowed[(module, "scalar")] = scalar
    return allowed


def read_network_pickle(path):
    """Unpickle an NVIDIA network pickle into stand-ins (NvidiaObject / TFNetwork), running no code from it."""
    import pickle
    import warnings

    allowed = _network_pickle_globals()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise _RefusedGlobal(f"{module}.{name}")
            return allowed[(module, name)]

    _check_path(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RestrictedUnpickler(f).load()
    except _RefusedGlobal as error:
        raise CheckpointError(
            f"{path} asks for {error} while unpickling, which network pickles never need; refusing to unpickle it (nothing was run)"
        ) from None
    except (EOFError, pickle.UnpicklingError) as error:
        if isinstance(error, EOFError) or "truncated" in str(error):
            raise CheckpointError(f"{path} is a truncated network pickle (its data ends early; copy or download it again)") from None
        raise CheckpointError(f"{path} is a damaged network pickle ({_first_line(error)})") from None
    except Exception as error:
        raise CheckpointError(f"{path} is a damaged network pickle ({type(error).__name__}: {_first_line(error)})") from None


NOT_STYLEGAN2 = "not a StyleGAN2 network (StyleGAN1, StyleGAN2 configs A-D and other architectures are not supported)"
BLUR_KERNEL = (1, 3, 3, 1)


def _take(tensors, name, path, what):
    if name not in tensors:
        raise CheckpointError(f"{path}: the {what} has no {name}; {NOT_STYLEGAN2}")
    return tensors.pop(name).detach().float()


def _one_value(values, what, path):
    values = set(values)
    if len(values) != 1:
        raise CheckpointError(f"{path}: the layers disagree on {what} ({sorted(map(str, values))}); not supported")
    return values.pop()


def _refuse_conditional(c_dim, path):
    if c_dim:
        raise CheckpointError(f"{path}: conditional StyleGAN2 pickles are not supported (c_dim {c_dim}: the networks need class labels)")


def _refuse_z_w_mismatch(z_dim, w_dim, path):
    if z_dim != w_dim:
        raise CheckpointError(f"{path}: z_dim {z_dim} differs from w_dim {w_dim}; only networks with z_dim == w_dim are supported")


def _check_resample_filters(tensors, path):
    """Pop NVIDIA's resample_filter buffers after checking they are StyleGAN2's [1, 3, 3, 1] filter."""
    expected = make_kernel(BLUR_KERNEL)
    for name in [n for n in tensors if n.endswith("resample_filter")]:
        kernel = tensors.pop(name)
        if tuple(kernel.shape) != tuple(expected.shape) or not torch.allclose(kernel.float(), expected, atol=1e-6):
            raise CheckpointError(f"{path}: {name} is not StyleGAN2's [1, 3, 3, 1] filter; not supported")


def _pytorch_generator(network, path):
    """(NVIDIA-named tensors, config) of a stylegan2-ada-pytorch / stylegan3-repo StyleGAN2 Generator."""
    if network.class_name != "Generator":
        raise CheckpointError(f"{path}: 'G' is a {network.class_name}, {NOT_STYLEGAN2}")
    _refuse_conditional(network.attr("c_dim", 0), path)
    synthesis, mapping = network.child("synthesis"), network.child("mapping")
    if synthesis is None or mapping is None:
        raise CheckpointError(f"{path}: the generator has no mapping / synthesis network; {NOT_STYLEGAN2}")
    if synthesis.child("input") is not None or any(m.class_name == "SynthesisInput" for m in synthesis.walk()):
        raise CheckpointError(f"{path} holds a StyleGAN3 (alias-free) generator, not StyleGAN2; only StyleGAN2 networks are supported")
    _refuse_z_w_mismatch(network.attr("z_dim"), network.attr("w_dim"), path)
    if network.attr("img_channels", 3) != 3:
        raise CheckpointError(f"{path}: the generator makes {network.attr('img_channels')}-channel images; only RGB is supported")
    architectures = {m.attr("architecture") for m in synthesis.walk() if m.class_name == "SynthesisBlock"}
    if architectures != {"skip"}:
        raise CheckpointError(f"{path}: generator architecture {sorted(map(str, architectures))} is not supported (StyleGAN2 uses 'skip')")
    layers = [m for m in synthesis.walk() if m.class_name in ("SynthesisLayer", "ToRGBLayer")]
    fully_connected = [m for m in mapping.walk() if m.class_name == "FullyConnectedLayer"]
    activation = _one_value([m.attr("activation") for m in layers if m.class_name == "SynthesisLayer"]
                            + [m.attr("activation") for m in fully_connected], "the activation", path)
    if activation != "lrelu":
        raise CheckpointError(f"{path}: activation {activation!r} is not supported (StyleGAN2 uses 'lrelu')")
    conv_clamp = _one_value([m.attr("conv_clamp") for m in layers], "conv_clamp", path)
    lr_mlp = _one_value([float(m.attr("bias_gain", 0.01)) for m in fully_connected], "the mapping learning-rate multiplier", path)
    tensors = network.tensors()
    _check_resample_filters(tensors, path)
    config = dict(size=int(network.attr("img_resolution")), conv_clamp=conv_clamp, lr_mlp=lr_mlp)
    return tensors, config


def _pytorch_discriminator(network, path):
    """(NVIDIA-named tensors, config) of a stylegan2-ada-pytorch / stylegan3-repo StyleGAN2 Discriminator."""
    if network.class_name != "Discriminator":
        raise CheckpointError(f"{path}: 'D' is a {network.class_name}, {NOT_STYLEGAN2}")
    _refuse_conditional(network.attr("c_dim", 0), path)
    epilogue = network.child("b4")
    mbstd = epilogue.child("mbstd") if epilogue is not None else None
    if mbstd is None:
        raise CheckpointError(f"{path}: the discriminator has no b4.mbstd (minibatch stddev) layer; {NOT_STYLEGAN2}")
    architectures = {m.attr("architecture") for m in network.walk() if m.class_name in ("DiscriminatorBlock", "DiscriminatorEpilogue")}
    if architectures != {"resnet"}:
        raise CheckpointError(f"{path}: discriminator architecture {sorted(map(str, architectures))} is not supported (StyleGAN2 uses 'resnet')")
    if mbstd.attr("num_channels", 1) != 1:
        raise CheckpointError(f"{path}: minibatch stddev with {mbstd.attr('num_channels')} channels is not supported (StyleGAN2 uses 1)")
    activated = [m for m in network.walk() if m.class_name == "Conv2dLayer" and m.attr("activation") != "linear"]
    if _one_value([m.attr("activation") for m in activated], "the activation", path) != "lrelu":
        raise CheckpointError(f"{path}: discriminator activation {activated[0].attr('activation')!r} is not supported (StyleGAN2 uses 'lrelu')")
    group = mbstd.attr("group_size")
    config = dict(
        size=int(network.attr("img_resolution")),
        conv_clamp=_one_value([m.attr("conv_clamp") for m in activated], "conv_clamp", path),
        stddev_group=None if group is None else int(group),
    )
    tensors = network.tensors()
    _check_resample_filters(tensors, path)
    return tensors, config


TF_GENERATOR_KWARGS = {
    "latent_size", "label_size", "dlatent_size", "resolution", "num_channels", "mapping_layers", "label_fmaps",
    "mapping_fmaps", "mapping_nonlinearity", "mapping_lrmul", "w_avg_beta", "fmap_base", "fmap_max", "num_fp16_res",
    "conv_clamp", "architecture", "resample_kernel", "use_noise", "nonlinearity", "truncation_psi",
    "truncation_cutoff", "style_mixing_prob", "structure",
}
TF_DISCRIMINATOR_KWARGS = {
    "label_size", "resolution", "num_channels", "architecture", "fmap_base", "fmap_max", "num_fp16_res", "conv_clamp",
    "mapping_fmaps", "nonlinearity", "resample_kernel", "freeze_layers", "mapping_layers", "mapping_lrmul",
    "mbstd_group_size", "mbstd_num_features", "structure",
}


def _tf_settings(network, known, defaults, path, what):
    """The network's static_kwargs after checking them the way NVIDIA's legacy.py does (unknown ones refused)."""
    if network.state.get("version", 0) < 4:
        raise CheckpointError(f"{path}: TensorFlow network pickle version {network.state.get('version')} is too old (StyleGAN1?); {NOT_STYLEGAN2}")
    kwargs = dict(network.state.get("static_kwargs") or {})
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CheckpointError(f"{path}: the TensorFlow {what} has setting {unknown[0]}={kwargs[unknown[0]]!r}; {NOT_STYLEGAN2}")
    _refuse_conditional(kwargs.get("label_size") or 0, path)
    for name, expected in defaults.items():
        value = kwargs.get(name)
        if value is not None and (list(value) if isinstance(expected, list) else value) != expected:
            raise CheckpointError(f"{path}: the TensorFlow {what} has {name}={value!r}; only {expected!r} is supported")
    return kwargs


def _tf_tensor(variables, name, path, what):
    import numpy as np

    if name not in variables:
        raise CheckpointError(f"{path}: the TensorFlow {what} has no variable {name}; {NOT_STYLEGAN2}")
    return np.asarray(variables[name], dtype=np.float32)


def _from_numpy(array):
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(array))


def _tf_generator(network, path):
    """(NVIDIA-named tensors, config) of a TF StyleGAN2 generator, by the rules of NVIDIA's legacy.py:
    dense weights transposed, conv weights [kh, kw, I, O] -> [O, I, kh, kw] (the up-sampling conv also flipped in
    both spatial axes), modulation biases + 1 (TF stores mod_bias - 1), const and noise inputs without batch axes."""
    kwargs = _tf_settings(
        network, TF_GENERATOR_KWARGS,
        dict(architecture="skip", nonlinearity="lrelu", mapping_nonlinearity="lrelu", resample_kernel=list(BLUR_KERNEL),
             use_noise=True, num_channels=3), path, "generator",
    )
    _refuse_z_w_mismatch(kwargs.get("latent_size", 512), kwargs.get("dlatent_size", 512), path)
    if kwargs.get("mapping_fmaps") not in (None, kwargs.get("dlatent_size", 512)):
        raise CheckpointError(f"{path}: mapping_fmaps {kwargs['mapping_fmaps']} differs from dlatent_size; not supported")
    variables = network.variables()
    if any(name.startswith(("ToRGB_lod", "synthesis/ToRGB_lod")) for name in variables):
        raise CheckpointError(f"{path}: generator architecture 'orig' is not supported (StyleGAN2 uses 'skip')")

    def var(name):
        return _tf_tensor(variables, name, path, "generator")

    size = int(kwargs.get("resolution", 1024))
    tensors = {"mapping.w_avg": _from_numpy(var("dlatent_avg"))}
    index = 0
    while f"mapping/Dense{index}/weight" in variables:
        tensors[f"mapping.fc{index}.weight"] = _from_numpy(var(f"mapping/Dense{index}/weight").T)  # [out, in]
        tensors[f"mapping.fc{index}.bias"] = _from_numpy(var(f"mapping/Dense{index}/bias"))
        index += 1
    tensors["synthesis.b4.const"] = _from_numpy(var("synthesis/4x4/Const/const")[0])  # [C, 4, 4]

    def layer(ours, theirs, noise_index, flip=False):
        weight = var(f"{theirs}/weight")  # [kh, kw, I, O]
        if flip:
            weight = weight[::-1, ::-1]
        tensors[f"{ours}.weight"] = _from_numpy(weight.transpose(3, 2, 0, 1))  # [O, I, kh, kw]
        tensors[f"{ours}.bias"] = _from_numpy(var(f"{theirs}/bias"))
        tensors[f"{ours}.affine.weight"] = _from_numpy(var(f"{theirs}/mod_weight").T)  # [I, w_dim]
        tensors[f"{ours}.affine.bias"] = _from_numpy(var(f"{theirs}/mod_bias") + 1)
        if noise_index is not None:
            tensors[f"{ours}.noise_strength"] = _from_numpy(var(f"{theirs}/noise_strength"))
            tensors[f"{ours}.noise_const"] = _from_numpy(var(f"synthesis/noise{noise_index}")[0, 0])  # [r, r]

    layer("synthesis.b4.conv1", "synthesis/4x4/Conv", 0)
    layer("synthesis.b4.torgb", "synthesis/4x4/ToRGB", None)
    for log_res in range(3, _log2_size(size) + 1):
        res = 2**log_res
        layer(f"synthesis.b{res}.conv0", f"synthesis/{res}x{res}/Conv0_up", 2 * log_res - 5, flip=True)
        layer(f"synthesis.b{res}.conv1", f"synthesis/{res}x{res}/Conv1", 2 * log_res - 4)
        layer(f"synthesis.b{res}.torgb", f"synthesis/{res}x{res}/ToRGB", None)
    config = dict(size=size, conv_clamp=kwargs.get("conv_clamp"), lr_mlp=float(kwargs.get("mapping_lrmul") or 0.01))
    return tensors, config


def _tf_discriminator(network, path):
    """(NVIDIA-named tensors, config) of a TF StyleGAN2 discriminator (legacy.py: weights transposed, none flipped)."""
    kwargs = _tf_settings(
        network, TF_DISCRIMINATOR_KWARGS,
        dict(architecture="resnet", nonlinearity="lrelu", resample_kernel=list(BLUR_KERNEL), num_channels=3, mbstd_num_features=1),
        path, "discriminator",
    )
    variables = network.variables()
    if any(name.startswith("FromRGB_lod") for name in variables):
        raise CheckpointError(f"{path}: discriminator architecture 'orig' is not supported (StyleGAN2 uses 'resnet')")

    def var(name):
        return _tf_tensor(variables, name, path, "discriminator")

    def conv(ours, theirs, bias=True):
        tensors[f"{ours}.weight"] = _from_numpy(var(f"{theirs}/weight").transpose(3, 2, 0, 1))  # [O, I, kh, kw]
        if bias:
            tensors[f"{ours}.bias"] = _from_numpy(var(f"{theirs}/bias"))

    def dense(ours, theirs):
        tensors[f"{ours}.weight"] = _from_numpy(var(f"{theirs}/weight").T)  # [out, in]
        tensors[f"{ours}.bias"] = _from_numpy(var(f"{theirs}/bias"))

    size = int(kwargs.get("resolution", 1024))
    tensors = {}
    conv(f"b{size}.fromrgb", f"{size}x{size}/FromRGB")
    for log_res in range(_log2_size(size), 2, -1):
        res = 2**log_res
        conv(f"b{res}.conv0", f"{res}x{res}/Conv0")
        conv(f"b{res}.conv1", f"{res}x{res}/Conv1_down")
        conv(f"b{res}.skip", f"{res}x{res}/Skip", bias=False)
    conv("b4.conv", "4x4/Conv")
    dense("b4.fc", "4x4/Dense0")
    dense("b4.out", "Output")
    # TF's D_stylegan2 pools groups of 4 unless told otherwise
    config = dict(size=size, conv_clamp=kwargs.get("conv_clamp"), stddev_group=kwargs.get("mbstd_group_size") or 4)
    return tensors, config


def rosinality_generator_state(tensors, size, path):
    """NVIDIA-named generator tensors (mapping.fc{i}, synthesis.b{r}.conv0/conv1/torgb, ...) -> rosinality's
    Generator state dict, blur kernels included. Every tensor must find its place."""
    tensors = dict(tensors)
    state = {}

    def take(name):
        return _take(tensors, name, path, "generator")

    n_mlp = len([name for name in tensors if name.startswith("mapping.fc") and name.endswith(".weight")])
    for i in range(n_mlp):
        state[f"style.{i + 1}.weight"] = take(f"mapping.fc{i}.weight")  # [out, in]
        state[f"style.{i + 1}.bias"] = take(f"mapping.fc{i}.bias")
    tensors.pop("mapping.w_avg", None)
    state["input.input"] = take("synthesis.b4.const")[None]  # [1, C, 4, 4]

    def styled_conv(ours, theirs, noise_index):
        state[f"{ours}.conv.weight"] = take(f"{theirs}.weight")[None]  # [1, O, I, 3, 3]
        state[f"{ours}.conv.modulation.weight"] = take(f"{theirs}.affine.weight")  # [I, w_dim]
        state[f"{ours}.conv.modulation.bias"] = take(f"{theirs}.affine.bias")
        state[f"{ours}.noise.weight"] = take(f"{theirs}.noise_strength").reshape(1)
        state[f"{ours}.activate.bias"] = take(f"{theirs}.bias")
        state[f"noises.noise_{noise_index}"] = take(f"{theirs}.noise_const")[None, None]  # [1, 1, r, r]

    def to_rgb(ours, theirs):
        state[f"{ours}.conv.weight"] = take(f"{theirs}.weight")[None]  # [1, 3, I, 1, 1]
        state[f"{ours}.conv.modulation.weight"] = take(f"{theirs}.affine.weight")
        state[f"{ours}.conv.modulation.bias"] = take(f"{theirs}.affine.bias")
        state[f"{ours}.bias"] = take(f"{theirs}.bias").reshape(1, 3, 1, 1)

    styled_conv("conv1", "synthesis.b4.conv1", 0)
    to_rgb("to_rgb1", "synthesis.b4.torgb")
    upsample_kernel = make_kernel(BLUR_KERNEL) * 4  # [4, 4]
    for log_res in range(3, _log2_size(size) + 1):
        res, k = 2**log_res, 2 * (log_res - 3)
        styled_conv(f"convs.{k}", f"synthesis.b{res}.conv0", k + 1)
        state[f"convs.{k}.conv.blur.kernel"] = upsample_kernel.clone()
        styled_conv(f"convs.{k + 1}", f"synthesis.b{res}.conv1", k + 2)
        to_rgb(f"to_rgbs.{log_res - 3}", f"synthesis.b{res}.torgb")
        state[f"to_rgbs.{log_res - 3}.upsample.kernel"] = upsample_kernel.clone()
    if tensors:
        raise CheckpointError(f"{path}: generator tensor {sorted(tensors)[0]} has no place in StyleGAN2; {NOT_STYLEGAN2}")
    return state


def rosinality_discriminator_state(tensors, size, path):
    """NVIDIA-named discriminator tensors (b{r}.fromrgb/conv0/conv1/skip, b4.conv/fc/out) -> rosinality's
    Discriminator state dict, blur kernels included."""
    tensors = dict(tensors)
    state = {}

    def take(name):
        return _take(tensors, name, path, "discriminator")

    state["convs.0.0.weight"] = take(f"b{size}.fromrgb.weight")  # [C, 3, 1, 1]
    state["convs.0.1.bias"] = take(f"b{size}.fromrgb.bias")
    for index, log_res in enumerate(range(_log2_size(size), 2, -1), start=1):
        res, ours = 2**log_res, f"convs.{index}"
        state[f"{ours}.conv1.0.weight"] = take(f"b{res}.conv0.weight")
        state[f"{ours}.conv1.1.bias"] = take(f"b{res}.conv0.bias")
        state[f"{ours}.conv2.0.kernel"] = make_kernel(BLUR_KERNEL)
        state[f"{ours}.conv2.1.weight"] = take(f"b{res}.conv1.weight")
        state[f"{ours}.conv2.2.bias"] = take(f"b{res}.conv1.bias")
        state[f"{ours}.skip.0.kernel"] = make_kernel(BLUR_KERNEL)
        state[f"{ours}.skip.1.weight"] = take(f"b{res}.skip.weight")
    state["final_conv.0.weight"] = take("b4.conv.weight")  # [C, C + 1, 3, 3]
    state["final_conv.1.bias"] = take("b4.conv.bias")
    state["final_linear.0.weight"] = take("b4.fc.weight")  # [C, C * 16]
    state["final_linear.0.bias"] = take("b4.fc.bias")
    state["final_linear.1.weight"] = take("b4.out.weight")  # [1, C]
    state["final_linear.1.bias"] = take("b4.out.bias")
    if tensors:
        raise CheckpointError(f"{path}: discriminator tensor {sorted(tensors)[0]} has no place in StyleGAN2; {NOT_STYLEGAN2}")
    return state


def _describe_pickle(data):
    if isinstance(data, dict):
        return "a dict with keys " + ", ".join(sorted(map(str, data))[:6])
    return type(data).__name__


def convert_network_pickle(data, path):
    """read_network_pickle's result -> (rosinality-layout checkpoint dict, format name).

    The dict has g (from G), g_ema (G_ema / Gs), d (D) as rosinality state dicts, latent_avg (w_avg /
    dlatent_avg, [style_dim]) and, when some option differs from rosinality's defaults, extra_config.
    """
    if isinstance(data, dict) and any(isinstance(data.get(key), NvidiaObject) for key in ("G", "D", "G_ema")):
        networks = {"g": data.get("G"), "g_ema": data.get("G_ema"), "d": data.get("D")}
        read_generator, read_discriminator = _pytorch_generator, _pytorch_discriminator
        kind, network_type = "NVIDIA PyTorch network pickle (stylegan2-ada-pytorch / stylegan3)", NvidiaObject
    elif isinstance(data, tuple) and len(data) == 3 and all(isinstance(net, TFNetwork) for net in data):
        networks = {"g": data[0], "d": data[1], "g_ema": data[2]}
        read_generator, read_discriminator = _tf_generator, _tf_discriminator
        kind, network_type = "NVIDIA TensorFlow StyleGAN2 pickle", TFNetwork
    elif isinstance(data, TFNetwork):
        networks = {"g_ema": data}
        read_generator, read_discriminator = _tf_generator, _tf_discriminator
        kind, network_type = "NVIDIA TensorFlow StyleGAN2 pickle (Gs only)", TFNetwork
    else:
        raise CheckpointError(f"{path} is a Python pickle but not an NVIDIA StyleGAN2 network pickle (it holds {_describe_pickle(data)})")

    ckpt, extras = {}, {}
    for name in ("g_ema", "g", "d"):  # g_ema first: latent_avg is its w_avg
        network = networks.get(name)
        if network is None:
            continue
        if not isinstance(network, network_type):
            raise CheckpointError(f"{path}: its {name} entry is a {type(network).__name__}, not a network")
        kind_of_net = "d" if name == "d" else "g"
        if name == "d":
            tensors, config = read_discriminator(network, path)
            ckpt[name] = rosinality_discriminator_state(tensors, config["size"], path)
        else:
            tensors, config = read_generator(network, path)
            if "latent_avg" not in ckpt and "mapping.w_avg" in tensors:
                ckpt["latent_avg"] = tensors["mapping.w_avg"].detach().float().reshape(-1)  # [style_dim]
            ckpt[name] = rosinality_generator_state(tensors, config["size"], path)
        options = {key: config[key] for key in EXTRA_OPTIONS[kind_of_net] if config[key] != EXTRA_DEFAULTS[key]}
        extras.setdefault(kind_of_net, options)
    extras = {kind_of_net: options for kind_of_net, options in extras.items() if options}
    if extras:
        ckpt["extra_config"] = extras
    return ckpt, kind


# ------------------------------------------------------------------------------------------------
# Loading any source checkpoint


NEEDS_D_MESSAGE = (
    "adaptation fine-tunes the source discriminator, so it needs the full training checkpoint "
    "(with 'g', 'g_ema' and 'd'), not a generator-only export"
)
# constructor options the rosinality layout cannot express, with rosinality's behaviour as the default
EXTRA_DEFAULTS = {"conv_clamp": None, "lr_mlp": 0.01, "stddev_group": 4}
EXTRA_OPTIONS = {"g": ("conv_clamp", "lr_mlp"), "d": ("conv_clamp", "stddev_group")}


def extra_config(models):
    """{"g": {...}, "d": {...}}: the options of these models that differ from rosinality's defaults (conv_clamp,
    lr_mlp, stddev_group), to store under "extra_config" next to their state dicts; {} when there are none."""
    extras = {}
    for name, model in models.items():
        kind = "d" if isinstance(model, Discriminator) else "g"
        options = {key: getattr(model, key) for key in EXTRA_OPTIONS[kind] if getattr(model, key) != EXTRA_DEFAULTS[key]}
        if options:
            extras[kind] = options
    return extras


def _stored_extras(ckpt, path):
    extras = ckpt.get("extra_config", {})
    valid = isinstance(extras, dict) and all(
        kind in EXTRA_OPTIONS and isinstance(options, dict) and set(options) <= set(EXTRA_OPTIONS[kind])
        for kind, options in extras.items()
    )
    if not valid:
        raise CheckpointError(f"{path}: 'extra_config' must map 'g' / 'd' to options among {EXTRA_OPTIONS}")
    return extras


def read_source_checkpoint(path):
    """(rosinality-layout checkpoint dict, format name) of a .pt checkpoint or an NVIDIA network pickle."""
    _check_path(path)
    if sniff_file(path)[0] == "pickle":
        return convert_network_pickle(read_network_pickle(path), path)
    return read_checkpoint(path), "PyTorch checkpoint (rosinality layout)"


def build_models(ckpt, path, require=("g", "g_ema", "d"), device="cpu"):
    """{name: model in eval mode} for the g / g_ema / d state dicts of a rosinality-layout checkpoint dict."""
    if not isinstance(ckpt, dict) or not any(k in ckpt for k in ("g", "g_ema", "d")):
        if _is_tensor_dict(ckpt) and "style.1.weight" in strip_module_prefix(ckpt):
            raise CheckpointError(
                f"{path} is a bare generator state dict, not a rosinality checkpoint with 'g', 'g_ema' and 'd'"
            )
        found = ", ".join(sorted(map(str, ckpt))[:6]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a StyleGAN2 checkpoint (expected keys 'g', 'g_ema', 'd'; found: {found})")
    missing = [name for name in require if name not in ckpt]
    if missing:
        have = ", ".join(f"'{k}'" for k in ("g", "g_ema", "d") if k in ckpt)
        extra = f": {NEEDS_D_MESSAGE}" if "d" in missing else ""
        raise CheckpointError(f"{path} has no {' or '.join(repr(m) for m in missing)} (only {have}){extra}")
    extras = _stored_extras(ckpt, path)
    models = {}
    for name in ("g", "g_ema", "d"):
        if name not in ckpt:
            continue
        if not _is_tensor_dict(ckpt[name]):
            raise CheckpointError(f"{path}: '{name}' is not a state dict of tensors")
        state_dict = strip_module_prefix(ckpt[name])
        if name == "d":
            model = Discriminator(**infer_discriminator_config(state_dict, name), **extras.get("d", {}))
        else:
            model = Generator(**infer_generator_config(state_dict, name), **extras.get("g", {}))
        model.load_state_dict(state_dict, strict=True)
        models[name] = model.to(device).eval()
    sizes = {name: m.size for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise CheckpointError(f"{path}: the networks disagree on resolution ({sizes})")
    return models


def load_checkpoint(path, require=("g", "g_ema", "d"), device="cpu"):
    """Load a source checkpoint: returns ({name: model in eval mode}, rosinality-layout checkpoint dict).

    Reads rosinality/CDC .pt files and NVIDIA network pickles (stylegan2-ada-pytorch and stylegan3-repo
    StyleGAN2 snapshots: G, D, G_ema; TensorFlow StyleGAN2: (G, D, Gs)), the latter converted to rosinality's
    layout with latent_avg and extra_config. The models are built from the tensor shapes (size, style dim,
    mapping depth, channel multiplier, channel cap) plus the stored extra_config, and loaded with strict=True
    after stripping a leading "module.". `require` lists the entries that must be present; "g_ema"/"g"/"d"
    present but not required are loaded too.
    """
    ckpt, _ = read_source_checkpoint(path)
    return build_models(ckpt, path, require, device), ckpt


# ------------------------------------------------------------------------------------------------
# Command line: convert and info


def write_atomically(path, write):
    """write(file) into a temporary file next to `path`, then a rename: a Ctrl-C or a crash never leaves a
    half-written file (checkpoints, pictures)."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_atomically(state, path):
    """torch.save to a temporary file next to `path` (synced to disk), then rename: never a half-written checkpoint."""
    import os

    def write(f):
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())

    write_atomically(path, write)


def convert_checkpoint(source, out):
    """Write `source` (any checkpoint load_checkpoint reads) as a rosinality-layout .pt: g, g_ema, d, latent_avg
    and, only when some option differs from rosinality's defaults, extra_config."""
    models, ckpt = load_checkpoint(source, require=("g_ema",))
    state = {name: model.state_dict() for name, model in models.items()}
    if "latent_avg" in ckpt:
        state["latent_avg"] = ckpt["latent_avg"]
    extras = extra_config(models)
    if extras:
        state["extra_config"] = extras
    save_atomically(state, out)
    return state


def describe_checkpoint(path):
    """Lines describing the configuration inferred from any checkpoint load_checkpoint reads."""
    ckpt, kind = read_source_checkpoint(path)
    models = build_models(ckpt, path, require=())
    generator = models.get("g_ema") or models.get("g")
    any_model = generator or models.get("d")
    lines = [f"file: {path}", f"format: {kind}", f"networks: {', '.join(models) or 'none'}"]
    if any_model is None:
        return lines
    lines.append(f"resolution: {any_model.size} px")
    if generator is not None:
        lines.append(f"style dim: {generator.style_dim} (z and w), mapping layers: {generator.n_mlp}, W+ codes: {generator.n_latent}")
    cap = "none" if any_model.channel_cap is None else any_model.channel_cap
    channels = ", ".join(f"{res}: {ch}" for res, ch in any_model.channels.items() if res <= any_model.size)
    lines.append(f"channel multiplier: {any_model.channel_multiplier}, channel cap: {cap} ({channels})")
    lines.append(f"latent_avg: {'stored' if 'latent_avg' in ckpt else 'not stored'}")
    extras = extra_config(models)
    described = "; ".join(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in options.items()) for kind, options in extras.items())
    lines.append(f"extra config: {described or 'none (rosinality defaults)'}")
    return lines


def main(argv=None):
    import sys

    parser = argparse.ArgumentParser(description="Convert or inspect StyleGAN2 checkpoints (rosinality .pt, NVIDIA .pkl).")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a network pickle (or .pt) as a rosinality-layout .pt with g, g_ema, d")
    convert.add_argument("source")
    convert.add_argument("out")
    info = commands.add_parser("info", help="print the configuration inferred from a checkpoint")
    info.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            state = convert_checkpoint(args.source, args.out)
            print(f"wrote {args.out} ({', '.join(state)})")
        else:
            print("\n".join(describe_checkpoint(args.path)))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
