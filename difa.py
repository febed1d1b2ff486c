"""DiFa: Towards Diverse and Faithful One-shot Adaption of Generative Adversarial Networks (Zhang et al., NeurIPS 2022).

Adapts a source StyleGAN2 G_A to ONE reference image I_ref without a discriminator. G_B starts as a copy of
G_A; only its constant input and styled convolutions train. Two CLIP ViTs (B/32 and B/16) give the
faithfulness terms, a frozen e4e encoder the diversity term:

Objective (paper Eq. 1-6, with the release's weights and schedule):
    E_m(x)     = unit CLIP image embedding of model m;  mu_m = mean_{z ~ N(0, I)} E_m(G_A(z))  (not re-normalised)
    d_m        = normalize(E_m(I_ref) - mu_m)
    L_global,m = mean_b 1 - cos( E_m(G_B(w_b)) - E_m(G_A(w_b)), d_m )              (independent noise for G_A, G_B)
    L_local,m  = mean_b max( mean_i min_j C_ij, mean_j min_i C_ij ),  C_ij = 1 - cos(t_B,i, t_ref,j)
                 (t: tokens of ViT block `clip_layer`, CLS excluded; t_ref from the real reference image)
    c_X        = e4e(G_X(w))[:, :K_layers].flatten()            (first `num_keep_first` W+ layers)
    dw         = mean(Q_B) - mean(Q_A)                          (FIFO queues of the last S batch means of c_B, c_A)
    mask       = 1 on the floor(alpha * K) channels of smallest |dw|   (domain-sharing attributes)
    L_scc      = sum_{b,k} mask_k |c_B,bk - c_A,bk| / (B K)
    L = sum_m c_m lambda_dir (L_global,m + lambda_partial L_local,m) + lambda_scc r(i) L_scc,
    r(i) = max(0, (i - S) / (iter - S))

Differs from cdc.py:
  - no discriminator (no adversarial loss, R1, path length or EMA: "g_ema" in the checkpoint is G_B itself,
    as in the release); w = G_A.mapping(z), one w broadcast to all layers, no style mixing;
  - the target is one reference image, read only through CLIP (224 px, bicubic, centre crop);
  - G_B's mapping network and ToRGB layers stay frozen; the source checkpoint needs only g_ema;
  - pretrained CLIP ViT-B/32, ViT-B/16 (in-file tower reading OpenAI's files) and e4e (in-file encoder reading
    e4e_ffhq_encode.pt) are loaded at start-up, and the CLIP mean of G_A samples is computed and cached;
  - sample grids at truncation 0.5 toward one mean latent shared by both halves.

Where this file departs from the public release (YBYBZhang/DiFa), defaults first:
  plain bugs fixed, no flag:  sampling passes do not push into the SCC queues; out-of-place token
    normalisation; a missing CLIP source mean is computed, never a silent zero; e4e and CLIP frozen; one
    shared mean latent for the truncated samples; strict generator load; seeds set before anything random.
  changes of results, behind flags:  --no-antialias reproduces the release's non-antialiased tensor resizes
    (default: antialiased, matching PIL's treatment of the reference); --e4e-bn train reproduces the
    release's training-mode BatchNorm in e4e (batch statistics of each 2-image call, drifting running stats).
  multiple references (not one-shot): token sets concatenated (release: averaged position-wise).
"""

import argparse
import collections
import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import common
from common import UserError
from stylegan2 import load_checkpoint, read_checkpoint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OpenAI's public files (clip.load's _MODELS); the hash in the path is the file's sha256
CLIP_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
E4E_FILE = "e4e_ffhq_encode.pt"
E4E_SOURCE = "https://github.com/omertov/encoder4editing (README, 'Pretrained Models': FFHQ Inversion)"
MEAN_LATENT_SAMPLES = 4096  # z samples for the truncation centre (release: mean_latent(4096))


def default_clip_path(name):
    """clip.load's cache: ~/.cache/clip/ViT-B-32.pt for 'ViT-B/32'."""
    return os.path.join(os.path.expanduser("~/.cache/clip"), name.replace("/", "-") + ".pt")


def default_e4e_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", E4E_FILE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DiFa one-shot adaptation (Zhang et al., NeurIPS 2022)")
    common.add_common_args(parser, origin="official README command", iter=301, batch=2, lr=0.002, seed=2,
                           sample_every=50, save_every=300, n_sample=4)
    # METHOD: global and local (attentive style) CLIP losses
    parser.add_argument("--clip-models", default="ViT-B/32,ViT-B/16", help="CLIP image towers m (default ViT-B/32,ViT-B/16: official)")
    parser.add_argument("--clip-weights", default=None,
                        help="comma-separated files, one per --clip-models entry: OpenAI's TorchScript archives or a plain state dict "
                             "with visual.* keys (default: clip.load's cache ~/.cache/clip/ViT-B-32.pt etc., downloaded there when absent)")
    parser.add_argument("--clip-model-weights", default="1.0,1.0", help="c_m, one per model (default 1.0,1.0: official)")
    parser.add_argument("--lambda-direction", type=float, default=1.0, help="lambda_dir, weight of L_global (and of L_local, inside it) (default 1: official)")
    parser.add_argument("--lambda-partial", type=float, default=1.0, help="lambda_partial, weight of the attentive style loss L_local (default 1: official README)")
    parser.add_argument("--clip-layer", type=int, default=3, help="ViT block (0-based) whose tokens feed L_local (default 3: official)")
    parser.add_argument("--clip-mean-samples", type=int, default=10000,
                        help="N, G_A samples for the CLIP source mean mu_m (default 10000: the release's offline pickles); cached in <out>/clip_source_mean.pt")
    parser.add_argument("--clip-mean-batch", type=int, default=8, help="batch of the mu_m computation (release: 1; only speed)")
    # METHOD: selective cross-domain consistency
    parser.add_argument("--e4e", default=None, help=f"e4e encoder ({E4E_FILE}: 'state_dict' with encoder.* keys, 'latent_avg') (default: {default_e4e_path()})")
    parser.add_argument("--psp-model-weight", type=float, default=6.0, help="lambda_scc (default 6: official README; 0 drops L_scc and e4e)")
    parser.add_argument("--num-keep-first", type=int, default=7, help="W+ layers kept in c (default 7: official)")
    parser.add_argument("--psp-alpha", type=float, default=0.6, help="alpha, fraction of the channels kept in the mask (default 0.6: official README)")
    parser.add_argument("--sliding-window-size", type=int, default=50, help="S, queue capacity and start of the ramp r(i) (default 50: official README)")
    parser.add_argument("--e4e-bn", choices=["eval", "train"], default="eval",
                        help="eval: frozen running statistics (fix, default); train: batch statistics per call and drifting running stats (release)")
    parser.add_argument("--no-antialias", action="store_true",
                        help="resize generated images to CLIP's 224 and e4e's 256 without antialiasing, as the release's tensor Resize (default: antialiased)")
    # SHARED: generator, optimiser, samples
    parser.add_argument("--g-reg-every", type=int, default=4,
                        help="lazy-regularisation scaling of Adam kept from StyleGAN2 (lr 0.0016, betas (0, 0.992)) though no regulariser runs (default 4: official)")
    parser.add_argument("--sample-truncation", type=float, default=0.5, help="truncation psi of the sample grids (default 0.5: official train.py)")
    args = common.parse_args_or_demo(parser, argv, "difa", target=os.path.join(common.DEMO_TARGET, "00.png"),
                                     iter=301, psp_model_weight=0.0, clip_mean_samples=1000)
    common.check_common_args(args)
    args.clip_models = [m.strip() for m in args.clip_models.split(",") if m.strip()]
    args.clip_model_weights = [float(c) for c in args.clip_model_weights.split(",")]
    paths = args.clip_weights.split(",") if args.clip_weights else [None] * len(args.clip_models)
    if not args.clip_models or len(args.clip_model_weights) != len(args.clip_models) or len(paths) != len(args.clip_models):
        raise UserError("--clip-models, --clip-model-weights and --clip-weights need one entry per CLIP model")
    args.clip_paths = paths
    if args.clip_layer < 0 or args.num_keep_first < 1 or args.sliding_window_size < 1 or args.clip_mean_samples < 1:
        raise UserError("--clip-layer must be >= 0; --num-keep-first, --sliding-window-size and --clip-mean-samples >= 1")
    if not 0 < args.psp_alpha <= 1:
        raise UserError(f"--psp-alpha must be in (0, 1], got {args.psp_alpha}")
    if args.out is None:
        args.out = common.default_out_dir("difa", args.target)
    return args


# ------------------------------------------------------------------------------------------------
# Networks: CLIP's ViT image tower (OpenAI key layout, visual.*)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # [B, L, W]
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, W/h]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(W/h)) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualBlock(width, heads) for _ in range(layers)])


class VisionTower(nn.Module):
    """CLIP's ViT image encoder, batch-first. forward(x) -> (embedding [B, out_dim] (not normalised),
    {layer: tokens [B, grid^2, width]}) with the tokens after block `layer` (0-based), CLS excluded."""

    def __init__(self, width=768, layers=12, patch=32, resolution=224, out_dim=512):
        super().__init__()
        self.resolution, self.patch = resolution, patch
        grid = resolution // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, max(1, width // 64))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    @property
    def depth(self):
        return len(self.transformer.resblocks)

    def forward(self, x, return_layers=()):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))  # [B, 1 + grid^2, W]
        tokens = {}
        for k, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if k in return_layers:
                tokens[k] = x[:, 1:]  # the block's residual stream, CLS dropped
        return self.ln_post(x[:, 0]) @ self.proj, tokens


def vision_config(state_dict):
    """VisionTower kwargs from OpenAI visual.* shapes (as clip.build_model reads them)."""
    width, _, patch, _ = state_dict["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    grid = round((state_dict["positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(width=width, layers=layers, patch=patch, resolution=grid * patch, out_dim=state_dict["proj"].shape[1])


def read_clip_state_dict(path):
    """visual.* of an OpenAI TorchScript archive (torch.jit.load, no clip package) or of a plain state dict."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            full = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        try:
            full = read_checkpoint(path)
        except Exception as error:
            raise UserError(f"CLIP weights {path}: neither a TorchScript archive nor a state dict ({str(error)[:160]})") from None
        if isinstance(full, dict) and isinstance(full.get("state_dict"), dict):
            full = full["state_dict"]
    if not isinstance(full, dict):
        raise UserError(f"CLIP weights {path}: not a state dict")
    visual = {k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.")}
    if "conv1.weight" not in visual or "proj" not in visual:
        raise UserError(f"CLIP weights {path}: no ViT image tower (visual.conv1.weight / visual.proj); DiFa needs ViT-B/32 and ViT-B/16")
    return {k: v.float() for k, v in visual.items()}


def resolve_clip_file(name, path):
    """An explicit path must exist; the default cache path is downloaded from OpenAI's public URL when absent."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"CLIP weights not found: {path} (OpenAI's {name} file, e.g. from {CLIP_URLS.get(name, 'clip.load')})")
        return path
    path = default_clip_path(name)
    if os.path.isfile(path):
        return path
    if name not in CLIP_URLS:
        raise UserError(f"no CLIP weights for {name!r} at {path} and no known download link (use ViT-B/32 or ViT-B/16, or pass --clip-weights)")
    url = CLIP_URLS[name]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading CLIP {name} to {path}")
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=url.split("/")[-2], progress=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"CLIP {name} is not in {path} and could not be downloaded from {url} ({reason[:120]}); "
                        "put that file there or pass --clip-weights") from None
    return path


def load_vision_tower(path):
    state_dict = read_clip_state_dict(path)
    tower = VisionTower(**vision_config(state_dict))
    try:
        tower.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise UserError(f"CLIP weights {path} do not fit a ViT image tower ({str(error).splitlines()[0][:160]})") from None
    return tower.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Networks: e4e (Encoder4Editing: IR-SE50 + FPN + map2style heads; key layout of encoder.*)


class SEModule(nn.Module):
    def __init__(self, channels, mid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.fc2 = nn.Conv2d(mid, channels, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """BN, conv3x3, PReLU, conv3x3 (stride), BN, SE; shortcut: 1x1 conv + BN, or subsampling when widths agree."""

    def __init__(self, cin, depth, stride, se_reduction=16):
        super().__init__()
        self.stride = stride
        self.shortcut_layer = None if cin == depth else nn.Sequential(
            nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth),
            SEModule(depth, max(1, depth // se_reduction)))

    def forward(self, x):
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class EqualLinear(nn.Module):
    """pSp's EqualLinear at lr_mul 1: y = x (W / sqrt(in))^T + b."""

    def __init__(self, din, dout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din))
        self.bias = nn.Parameter(torch.zeros(dout))

    def forward(self, x):
        return F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)


class StyleHead(nn.Module):
    """map2style: log2(spatial) stride-2 conv3x3 + LeakyReLU(0.01), then EqualLinear."""

    def __init__(self, channels, style_dim, spatial):
        super().__init__()
        layers = []
        for k in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels if k == 0 else style_dim, style_dim, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(style_dim, style_dim)

    def forward(self, x):
        return self.linear(self.convs(x).flatten(1))


class E4E(nn.Module):
    """Encoder4Editing at the inference stage: w+ = w0 1 + [0, delta_1 .. delta_{n-1}] + latent_avg, [B, n_styles, D].

    widths / units: the IR-SE body's four stages (IR-SE50: 64, 128, 256, 512 / 3, 4, 14, 3); the taps c1, c2, c3
    are the ends of stages 2, 3, 4; heads 0-2 read c3, 3-6 p2 = up(c3) + lat1(c2), 7.. p1 = up(p2) + lat2(c1).
    """

    COARSE, MIDDLE = 3, 7

    def __init__(self, widths=(64, 128, 256, 512), units=(3, 4, 14, 3), style_dim=512, n_styles=18, size=256, se_reduction=16):
        super().__init__()
        self.size = size
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        body, cin, self.taps = [], widths[0], []
        for width, n in zip(widths, units):
            for k in range(n):
                body.append(BottleneckIRSE(cin, width, 2 if k == 0 else 1, se_reduction))
                cin = width
            self.taps.append(len(body) - 1)
        self.body = nn.Sequential(*body)
        c3 = size // 16
        self.styles = nn.ModuleList(
            StyleHead(widths[3], style_dim, c3 if i < self.COARSE else 2 * c3 if i < self.MIDDLE else 4 * c3) for i in range(n_styles))
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], 1)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], 1)
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim))

    def forward(self, x):  # x: [B, 3, size, size] normalised to [-1, 1]
        x = self.input_layer(x)
        feats = {}
        for k, unit in enumerate(self.body):
            x = unit(x)
            feats[k] = x
        c1, c2, c3 = (feats[t] for t in self.taps[1:])

        def up_add(a, b):
            return F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True) + b

        w = self.styles[0](c3)[:, None].repeat(1, len(self.styles), 1)  # [B, n, D]
        deltas, features = [torch.zeros_like(w[:, 0])], c3
        for i in range(1, len(self.styles)):
            if i == self.COARSE:
                p2 = features = up_add(c3, self.latlayer1(c2))
            elif i == self.MIDDLE:
                features = up_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](features))
        return w + torch.stack(deltas, 1) + self.latent_avg


def e4e_config(state_dict):
    """E4E kwargs from encoder.* shapes."""
    n_units = len({k.split(".")[1] for k in state_dict if k.startswith("body.")})
    widths, units = [], []
    for k in range(n_units):
        depth = state_dict[f"body.{k}.res_layer.1.weight"].shape[0]
        if not widths or depth != widths[-1]:
            widths.append(depth)
            units.append(0)
        units[-1] += 1
    n_styles = len({k.split(".")[1] for k in state_dict if k.startswith("styles.")})
    n_convs = len({k.split(".")[3] for k in state_dict if k.startswith("styles.0.convs.")})
    se_mid = state_dict["body.0.res_layer.5.fc1.weight"].shape[0]
    return dict(widths=tuple(widths), units=tuple(units), style_dim=state_dict["styles.0.linear.weight"].shape[0],
                n_styles=n_styles, size=16 * 2**n_convs, se_reduction=max(1, widths[0] // se_mid))


def load_e4e(path):
    if not path:
        path = default_e4e_path()
        if not os.path.isfile(path):
            raise UserError(f"the e4e encoder is needed for L_scc: get {E4E_FILE} from {E4E_SOURCE} and put it at {path} "
                            "(or pass --e4e PATH; --psp-model-weight 0 runs without it)")
    elif not os.path.isfile(path):
        raise UserError(f"e4e weights not found: {path} (get {E4E_FILE} from {E4E_SOURCE})")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "latent_avg" not in ckpt:
        raise UserError(f"{path} is not an e4e checkpoint (expected 'state_dict' with encoder.* keys and 'latent_avg')")
    state_dict = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing" or "styles.0.linear.weight" not in state_dict:
        raise UserError(f"{path}: not an Encoder4Editing checkpoint (encoder_type {opts.get('encoder_type')!r})")
    try:
        encoder = E4E(**e4e_config(state_dict))
        latent_avg = ckpt["latent_avg"].float()
        state_dict["latent_avg"] = latent_avg.reshape(-1, latent_avg.shape[-1]).expand_as(encoder.latent_avg).clone()
        encoder.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise UserError(f"{path}: the encoder.* weights do not fit e4e ({str(error).splitlines()[0][:160]})") from None
    return encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# METHOD: preprocessing


def clip_input(x, resolution, antialias=True):
    """Generated images in [-1, 1] -> CLIP input: bicubic resize to resolution^2, (x+1)/2, CLIP normalisation."""
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=antialias)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def e4e_input(x, size, antialias=True):
    """[-1, 1] -> e4e input: bilinear resize to size^2; (x01 - 0.5) / 0.5 is x again."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def load_reference(path, resolution):
    """CLIP's PIL preprocessing of a reference: alpha on white, shorter side to `resolution` (bicubic,
    antialiased), centre crop, normalisation -> [1, 3, resolution, resolution]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = common.open_rgb(path)  # alpha on white
    image = TF.center_crop(TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC), resolution)
    x = TF.to_tensor(image)[None]  # [1, 3, R, R] in [0, 1]
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------
# METHOD: the losses (pure functions)


def global_clip_loss(emb_b, emb_a, direction):
    """mean_b 1 - cos(normalize(E(x_B) - E(x_A)), d); emb_* [B, D] unit embeddings, direction [D] or [1, D]."""
    delta = F.normalize(emb_b - emb_a, dim=-1, eps=1e-8)
    return (1 - F.cosine_similarity(delta, direction.reshape(1, -1), dim=-1)).mean()


def attentive_style_loss(tokens, ref_tokens):
    """Relaxed EMD between token sets: mean_b max(mean_i min_j C_ij, mean_j min_i C_ij), C = 1 - cos.

    tokens [B, N, D]; ref_tokens [N', D] (shared) or [B, N', D]. Value in [0, 2]; 0 for equal sets.
    """
    if ref_tokens.ndim == 2:
        ref_tokens = ref_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    a = F.normalize(tokens, dim=-1, eps=1e-8)
    b = F.normalize(ref_tokens, dim=-1, eps=1e-8)
    cost = 1 - a @ b.transpose(1, 2)  # [B, N, N']
    forward = cost.min(2).values.mean(1)  # [B], each token to its nearest reference token
    backward = cost.min(1).values.mean(1)  # [B], each reference token to its nearest token
    return torch.maximum(forward, backward).mean()


def scc_mask(delta_w, alpha):
    """1 on the floor(alpha K) channels of smallest |delta_w| (ties: lower index first), else 0; [K]."""
    k = int(alpha * delta_w.numel())
    order = torch.argsort(delta_w.abs(), stable=True)
    mask = torch.zeros_like(delta_w)
    mask[order[:k]] = 1
    return mask


def scc_loss(codes_b, codes_a, mask):
    """sum_{b,k} mask_k |c_B - c_A| / (B K), the release's F.l1_loss(mask c_B, mask c_A); codes [B, K]."""
    return (mask * (codes_b - codes_a).abs()).mean()


def scc_ramp(i, total, window):
    """r(i) = max(0, (i - S) / (iter - S))."""
    return max(0.0, (i - window) / max(1, total - window))


class CodeQueues:
    """Q_A and Q_B: FIFO queues of the last `size` batch means of kept e4e codes; delta_w = mean(Q_B) - mean(Q_A)."""

    def __init__(self, size):
        self.a = collections.deque(maxlen=size)
        self.b = collections.deque(maxlen=size)

    def push(self, codes_a, codes_b):
        self.a.append(codes_a.detach().mean(0))
        self.b.append(codes_b.detach().mean(0))

    def delta_w(self):
        return torch.stack(list(self.b)).mean(0) - torch.stack(list(self.a)).mean(0)

    def state_dict(self):
        return {"a": [t.clone() for t in self.a], "b": [t.clone() for t in self.b]}

    def load_state_dict(self, state, device):
        self.a.clear(), self.b.clear()
        self.a.extend(t.to(device) for t in state["a"])
        self.b.extend(t.to(device) for t in state["b"])


def trainable_generator_parameters(g):
    """The release's phase=None set: the constant input, conv1 and all convs (ToRGB and mapping frozen)."""
    return [p for name, p in g.named_parameters() if name.split(".")[0] in ("input", "conv1", "convs")]


# ------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def clip_source_mean(g_a, tower, n, batch, antialias, seed):
    """mu_m: mean unit embedding of n G_A(z) samples (truncation 1, random noise), not re-normalised.
    Drawn from a forked RNG seeded with `seed`, so the run's own random stream does not depend on it."""
    total = None
    device = g_a.input.input.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), g_a.style_dim, device=device)
            x, _ = g_a([z])
            emb = F.normalize(tower(clip_input(x, tower.resolution, antialias))[0], dim=-1).sum(0)
            total = emb if total is None else total + emb
    return total / n


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)

    # SHARED: source checkpoint (only g_ema), reference, run folder
    models, source_ckpt = load_checkpoint(args.source, require=("g_ema",), device=device)
    g_source = models["g_ema"]  # G_A, frozen
    common.requires_grad(g_source, False)
    generator = copy.deepcopy(g_source).train()  # G_B
    common.requires_grad(generator, False)
    params = trainable_generator_parameters(generator)
    for p in params:
        p.requires_grad_(True)
    references = common.list_images(args.target)
    run = common.RunDir(args.out)
    latent_dim, n_latent = generator.style_dim, generator.n_latent

    # METHOD: CLIP towers, reference embeddings and tokens
    antialias = not args.no_antialias
    towers = []
    for name, path in zip(args.clip_models, args.clip_paths):
        tower = load_vision_tower(resolve_clip_file(name, path)).to(device)
        if args.clip_layer >= tower.depth:
            raise UserError(f"--clip-layer {args.clip_layer}: {name} has only {tower.depth} blocks")
        towers.append(tower)
    ref_emb, ref_tokens = [], []
    with torch.no_grad():
        for tower in towers:
            x = torch.cat([load_reference(p, tower.resolution) for p in references]).to(device)
            emb, tokens = tower(x, return_layers=(args.clip_layer,))
            ref_emb.append(F.normalize(emb, dim=-1).mean(0))  # [D]
            ref_tokens.append(tokens[args.clip_layer].reshape(-1, tokens[args.clip_layer].shape[-1]))  # [n N, W]
    encoder = None
    if args.psp_model_weight > 0:
        encoder = load_e4e(args.e4e).to(device)
        if args.e4e_bn == "train":
            encoder.train()  # release: BatchNorm on batch statistics
        if encoder.latent_avg.shape[0] < args.num_keep_first or encoder.latent_avg.shape[1] != latent_dim:
            raise UserError(f"e4e codes are {tuple(encoder.latent_avg.shape)} but the generator has {n_latent} x {latent_dim} "
                            f"and --num-keep-first {args.num_keep_first}")
    if args.num_keep_first > n_latent:
        raise UserError(f"--num-keep-first {args.num_keep_first} exceeds the generator's {n_latent} W+ layers")

    g_optim = common.make_adam(params, args.lr, args.g_reg_every)
    queues = CodeQueues(args.sliding_window_size)
    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
    with torch.no_grad():
        mean_latent = g_source.mean_latent(MEAN_LATENT_SAMPLES)  # [1, D], shared by both grid halves
    start = 0
    resume_path = common.resolve_resume(args.resume, run)
    state = None
    if resume_path:
        state = common.load_training_checkpoint(resume_path)
        if "queues" not in state or "g_optim" not in state:
            raise UserError(f"{resume_path} was not written by difa.py (no SCC queues); cannot resume from it")
        try:
            generator.load_state_dict(state["g"])
            g_optim.load_state_dict(state["g_optim"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise UserError(f"the resume checkpoint does not match this run's models ({str(error).splitlines()[0][:200]})") from None
        queues.load_state_dict(state["queues"], device)
        sample_z, mean_latent = state["sample_z"].to(device), state["mean_latent"].to(device)
        if encoder is not None and "e4e_buffers" in state:
            encoder.load_state_dict({**encoder.state_dict(), **state["e4e_buffers"]})

    # METHOD: mu_m and the reference directions d_m (from the checkpoint on resume, else the cache or computed)
    cache_path = os.path.join(run.root, "clip_source_mean.pt")
    key = {"source": os.path.abspath(args.source), "models": ",".join(args.clip_models), "n": args.clip_mean_samples,
           "antialias": antialias, "seed": args.seed, "clip_files": ",".join(map(str, args.clip_paths))}
    if state is not None and "clip_source_mean" in state:
        mus = [m.to(device) for m in state["clip_source_mean"]]
    else:
        try:
            cached = torch.load(cache_path, weights_only=True) if os.path.exists(cache_path) else None
        except Exception:
            cached = None  # unreadable cache: recomputed below
        if isinstance(cached, dict) and cached.get("key") == key:
            mus = [m.to(device) for m in cached["mu"]]
        else:
            print(f"computing the CLIP source mean from {args.clip_mean_samples} G_A samples")
            mus = [clip_source_mean(g_source, t, args.clip_mean_samples, args.clip_mean_batch, antialias, args.seed + 1) for t in towers]
            common.save_checkpoint(cache_path, {"key": key, "mu": [m.cpu() for m in mus]})
    directions = [F.normalize(e - m, dim=-1, eps=1e-8) for e, m in zip(ref_emb, mus)]
    if state is not None:
        common.set_rng_state(state["rng"])
        start = int(state["iter"])
        print(f"resuming {resume_path} at iteration {start}")

    # SHARED: the source half of the sample grids, one fixed noise for both halves
    fixed_noise = [getattr(g_source.noises, f"noise_{k}") for k in range(g_source.num_layers)]
    with torch.no_grad():
        source_samples = g_source([sample_z], truncation=args.sample_truncation, truncation_latent=mean_latent, noise=fixed_noise)[0].cpu()

    def save(i_next):
        path = run.checkpoint_path(i_next)
        extra = {"d": source_ckpt["d"]} if "d" in source_ckpt else {}
        if encoder is not None and args.e4e_bn == "train":
            extra["e4e_buffers"] = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k or "num_batches" in k}
        common.save_checkpoint(path, {
            "g": generator.state_dict(), "g_ema": generator.state_dict(), **extra,  # no EMA: g_ema is G_B, as the release
            "g_optim": g_optim.state_dict(), "args": common.args_to_dict(args), "iter": i_next, "rng": common.get_rng_state(),
            "queues": queues.state_dict(), "sample_z": sample_z, "mean_latent": mean_latent,
            "clip_source_mean": [m.cpu() for m in mus],
        })
        return path

    def write_samples(i):
        with torch.no_grad():  # no losses, no queue pushes
            adapted = generator([sample_z], truncation=args.sample_truncation, truncation_latent=mean_latent, noise=fixed_noise)[0]
        common.save_comparison_grid(run.sample_path(i), source_samples, adapted)

    log = common.CSVLog(run.log_path, resume_from=start if resume_path else None)
    pbar = common.progress_bar(start, args.iter)
    with common.StopOnInterrupt() as interrupt:
        for i in pbar:
            # METHOD: one w per sample, the same w for both generators, independent noise
            with torch.no_grad():
                w = g_source.get_latent(torch.randn(args.batch, latent_dim, device=device))  # [B, D]
                x_a, _ = g_source([w], input_is_latent=True)
            x_b, _ = generator([w], input_is_latent=True)

            # METHOD: global and local CLIP losses, tokens from the same forward as E(x_B)
            global_loss, local_loss, clip_total = (torch.zeros((), device=device) for _ in range(3))
            for tower, weight, direction, tokens_ref in zip(towers, args.clip_model_weights, directions, ref_tokens):
                with torch.no_grad():
                    emb_a = F.normalize(tower(clip_input(x_a, tower.resolution, antialias))[0], dim=-1)
                emb_b, tokens = tower(clip_input(x_b, tower.resolution, antialias), return_layers=(args.clip_layer,))
                g_m = global_clip_loss(F.normalize(emb_b, dim=-1), emb_a, direction)
                l_m = attentive_style_loss(tokens[args.clip_layer], tokens_ref) if args.lambda_partial else torch.zeros((), device=device)
                clip_total = clip_total + weight * args.lambda_direction * (g_m + args.lambda_partial * l_m)
                global_loss, local_loss = global_loss + weight * g_m.detach(), local_loss + weight * l_m.detach()

            # METHOD: selective cross-domain consistency (queues filled every step, ramped weight)
            ramp = scc_ramp(i, args.iter, args.sliding_window_size)
            scc = torch.zeros((), device=device)
            if encoder is not None:
                keep = args.num_keep_first
                with torch.no_grad():
                    codes_a = encoder(e4e_input(x_a, encoder.size, antialias))[:, :keep].flatten(1)  # [B, K]
                with torch.set_grad_enabled(ramp > 0):
                    codes_b = encoder(e4e_input(x_b, encoder.size, antialias))[:, :keep].flatten(1)  # [B, K]
                queues.push(codes_a, codes_b)
                scc = scc_loss(codes_b, codes_a, scc_mask(queues.delta_w(), args.psp_alpha))
            loss = clip_total + args.psp_model_weight * ramp * scc
            g_optim.zero_grad(set_to_none=True)
            loss.backward()
            g_optim.step()

            # SHARED: logging, samples, checkpoints
            losses = {"loss": loss.item(), "global": global_loss.item(), "local": local_loss.item(), "scc": scc.item(), "scc_ramp": ramp}
            pbar.set_postfix_str(common.format_losses(losses))
            log.write(i, losses)
            if i % args.sample_every == 0:
                write_samples(i)
            if (i + 1) % args.save_every == 0:
                save(i + 1)
            if interrupt.requested:
                path = save(i + 1)
                pbar.close()
                print(f"stopped after iteration {i}; resume with --resume {path}")
                raise SystemExit(130)
    pbar.close()
    write_samples(args.iter)
    path = save(args.iter)
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    common.run_main(main)
