"""DiFa: Towards Diverse and Faithful One-shot Adaption of Generative Adversarial Networks (Zhang et al., NeurIPS 2022).

Adapts a source StyleGAN2 G_A to ONE reference image I_ref without a discriminator. G_B starts as a copy of
G_A; only its constant input and styled convolutions train. Two CLIP ViTs (B/32 and B/16) give the
faithfulness terms, a frozen e4e encoder the diversity term:

Objective (paper Eq. 1-6, with the release's weights and schedule):
    E_m(x)     = unit CLIP image embedding of model m;  mu_m = mean_{z ~ N(0, I)} E_m(G_A(z))  (not re-normalised)
    d_m        = normalize(normalize(mean_r E_m(I_r)) - mu_m)    (one reference: normalize(E_m(I_ref) - mu_m))
    L_global,m = mean_b 1 - cos( E_m(G_B(w_b)) - E_m(G_A(w_b)), d_m )              (independent noise for G_A, G_B)
    L_local,m  = mean_b max( mean_i min_j C_ij, mean_j min_i C_ij ),  C_ij = 1 - cos(t_B,i, t_ref,j)
                 (t: tokens of ViT block `clip_layer`, CLS excluded; t_ref from the real reference image,
                  the first one when there are several)
    c_X        = e4e(G_X(w))[:, :K_layers].flatten()            (first `num_keep_first` W+ layers)
    dw         = mean(Q_B) - mean(Q_A)                          (FIFO queues of the last S batch means of c_B, c_A)
    mask       = 1 on the floor(alpha * K) channels of smallest |dw|   (domain-sharing attributes)
    L_scc      = sum_{b,k} mask_k |c_B,bk - c_A,bk| / (B K)
    L = sum_m c_m lambda_dir (L_global,m + lambda_partial L_local,m) + lambda_scc r(i) L_scc,
    r(i) = max(0, (i - S) / (iter - S))

Differs from cdc.py: no discriminator (no adversarial loss, R1, path length or EMA: "g_ema" in the checkpoint is G_B
itself, as in the release); w = G_A.mapping(z), one w broadcast to all layers, no style mixing; the target is one
reference image, read through CLIP's own preprocessing (pretrained.load_reference: alpha dropped, not composited);
G_B's mapping and ToRGB layers stay frozen, the source needs only g_ema; CLIP ViT-B/32, ViT-B/16 and e4e
(pretrained.py) are loaded at start-up, the CLIP mean of G_A samples computed and cached; sample grids at truncation
0.5 toward one mean latent shared by both halves.

Where this file departs from the public release (YBYBZhang/DiFa), defaults first:
  plain bugs fixed, no flag:  sampling passes do not push into the SCC queues; out-of-place token
    normalisation; a missing CLIP source mean is computed, never a silent zero; e4e and CLIP frozen; one
    shared mean latent for the truncated samples; strict generator load; seeds set before anything random.
  changes of results, behind flags:  --no-antialias reproduces the release's non-antialiased tensor resizes
    (default: antialiased, matching PIL's treatment of the reference); --e4e-bn train reproduces the
    release's training-mode BatchNorm in e4e (batch statistics of each 2-image call, drifting running stats).
  multiple references (not one-shot; the release's train.py even fails on a folder, as it copies
    --style_img_dir with shutil.copy2, so this is what its CLIP loss does with a list):  d_m re-normalises the
    mean reference embedding, as the release; L_local uses the first reference's tokens only (sorted name
    order here, os.listdir order there), as the release, whose hooked token list is never cleared between
    references, so every token map it averages is the first image's; --ref-tokens all (fix) uses the union
    of all references' token sets.

SCC follows the public release (criteria/psp_loss.py: two queues, dw = mean(Q_B) - mean(Q_A) over the same steps), not
the DatasetGAN branch of the development fork (1170300521/StyleGAN-nada), which queues only G_B's codes and subtracts
a fixed mu_A, the mean e4e code of G_A samples precomputed offline (ffhq_A_gen_w.npy); its paper scripts use S = 30,
alpha 0.5 / 0.7 and lambda_scc 5. In the release mu_A and mu_B come from the same w, so which w the window happened to
draw cancels in dw; in the branch it stays (the last S batches of G_B against a fixed mean).

Zero-shot text target (--target-text T, --source-text S, in place of --target):
    t_k, s_k = unit CLIP text embeddings of NADA's template k filled with T and with S (NADA_TEMPLATES, 79)
    d_m      = normalize(mean_k t_k - mean_k s_k)      (NADA's compute_text_direction; the means not re-normalised)
    L = sum_m c_m lambda_dir L_global,m + lambda_scc r(i) L_scc     (no L_local: there are no reference tokens)
  The release has this mode (compute_text_direction with --source_type source; its default --source_type mean
  subtracts mu_m from each t_k instead). Text tower m from image tower m's OpenAI file, BPE vocabulary from --clip-vocab.
  StyleGAN-NADA (--baseline nada, DiFa's baseline) is nada.py, on this file's pure functions and start-up.
"""

import argparse
import collections
import copy
import os
import re

import torch
import torch.nn.functional as F

import common
import runtime
from common import UserError
from pretrained import (E4E_FILE, clip_input, default_e4e_path, e4e_input, load_e4e, load_reference, load_text_tower,
                        load_vision_tower, resolve_clip_file, tokenize, vocab_size)
from checkpoints import load_checkpoint

MEAN_LATENT_SAMPLES = 4096  # z samples for the truncation centre (release: mean_latent(4096))
DEMO_REFERENCE = os.path.join(runtime.DEMO_DIR, "targets", "sunglasses", "00.png")  # `python difa.py`: one toy face with sunglasses
# NADA's text templates: imagenet_templates of rinongal/StyleGAN-nada ZSSGAN/utils/text_templates.py (CLIP's ImageNet
# prompts), the ones its compute_text_direction fills with the source and target texts (and DiFa's release with them;
# NADA's part_templates serve only its patch loss, lambda_patch 0, not used)
NADA_TEMPLATES = (
    "a bad photo of a {}.", "a sculpture of a {}.", "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
# DiFa's options, refused with --baseline nada (NADA's, nada.OPTIONS, are refused without it)
DIFA_ONLY = ("lambda_partial", "clip_layer", "ref_tokens", "clip_mean_samples", "e4e", "psp_model_weight", "num_keep_first",
             "psp_alpha", "sliding_window_size", "e4e_bn")


def text_slug(text):
    """A folder-name form of a text target: 'a Pencil sketch!' -> 'a-pencil-sketch'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "text"


def parse_args(argv=None):
    import nada  # here, not at the top: nada.py imports this file
    # --baseline picks the defaults that differ between the two READMEs (checkpoint cadence, sample truncation)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--baseline", default=None)
    nada_run = pre.parse_known_args(argv)[0].baseline == "nada"
    origin = "StyleGAN-NADA README command" if nada_run else "official README command"
    parser = argparse.ArgumentParser(description="DiFa one-shot adaptation (Zhang et al., NeurIPS 2022), or the StyleGAN-NADA "
                                                 "baseline (Gal et al., SIGGRAPH 2022) with --baseline nada")
    runtime.add_common_args(parser, origin=origin, iter=301, batch=2, lr=0.002, seed=2,  # the same in both READMEs (NADA: seed 2 in train.py)
                           sample_every=50, save_every=150 if nada_run else 300, n_sample=4)
    parser.add_argument("--baseline", choices=["nada"], default=None,
                        help="nada: StyleGAN-NADA instead of DiFa: the directional CLIP loss only, with its adaptive layer selection "
                             "(`--baseline nada --help` lists NADA's defaults)")
    # METHOD: the target, when it is a text (zero-shot)
    parser.add_argument("--target-text", default=None,
                        help="zero-shot target text T in place of --target (NADA's --target_class), e.g. 'a sketch with black pencils'; "
                             "without --source: the demo source")
    parser.add_argument("--prompt-template", default=None,
                        help="one template for every text, e.g. 'a {} of a face' (default: NADA's 79 ImageNet templates for the "
                             "direction and the bare text for the layer selection, as NADA's code; the demo: 'a {} of a face', the "
                             "toy CLIP's caption grammar, which has never seen NADA's templates)")
    parser.add_argument("--source-text", default="photo", help="source text S of the text direction (default photo: both READMEs' --source_class)")
    parser.add_argument("--clip-vocab", default=None,
                        help="CLIP's BPE merges file for the text prompts (default: OpenAI's bpe_simple_vocab_16e6.txt.gz of an installed "
                             "clip package, else ~/.cache/clip/, downloaded there when absent)")
    # METHOD: global and local (attentive style) CLIP losses
    parser.add_argument("--clip-models", default="ViT-B/32,ViT-B/16", help=f"CLIP image towers m (default ViT-B/32,ViT-B/16: {origin})")
    parser.add_argument("--clip-weights", default=None,
                        help="comma-separated files, one per --clip-models entry: OpenAI's TorchScript archives or a plain state dict "
                             "with visual.* keys, and the text tower's keys for --target-text "
                             "(default: clip.load's cache ~/.cache/clip/ViT-B-32.pt etc., downloaded there when absent)")
    parser.add_argument("--clip-model-weights", default="1.0,1.0", help=f"c_m, one per model (default 1.0,1.0: {origin})")
    parser.add_argument("--lambda-direction", type=float, default=1.0, help="lambda_dir, weight of L_global (and of L_local, inside it) (default 1: official; NADA's --lambda_direction 1 too)")
    parser.add_argument("--lambda-partial", type=float, default=1.0, help="lambda_partial, weight of the attentive style loss L_local (default 1: official README)")
    parser.add_argument("--clip-layer", type=int, default=3, help="ViT block (0-based) whose tokens feed L_local (default 3: official)")
    parser.add_argument("--ref-tokens", choices=["first", "all"], default="first",
                        help="reference tokens of L_local when --target is a folder of several images: first: the first image's only "
                             "(default: official, the release's token list is never cleared between references); all: the union of "
                             "every reference's token set (fix). Identical for one reference")
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
    nada.add_arguments(parser)  # StyleGAN-NADA's own options
    # SHARED: generator, optimiser, samples
    parser.add_argument("--g-reg-every", type=int, default=4,
                        help="lazy-regularisation scaling of Adam kept from StyleGAN2 (lr 0.0016, betas (0, 0.992)) though no regulariser runs (default 4: official)")
    parser.add_argument("--sample-truncation", type=float, default=0.7 if nada_run else 0.5,
                        help="truncation psi of the sample grids (default " + ("0.7: NADA's train_options" if nada_run else "0.5: official train.py") + ")")
    first = parser.parse_args(argv)
    if first.target_text is not None:
        if first.target is not None:
            raise UserError("--target-text and --target are exclusive: a run adapts to a text or to reference images")
        if first.source is not None:
            parser.set_defaults(target=text_slug(first.target_text))  # stands in for --target, which a run with --source needs
    # the demo's one reference: a toy face with sunglasses, a style the 16-px toy CLIP can see (it reads a whitened face
    # as a pencil sketch, so from a sketch DiFa and NADA whiten instead of drawing lines; docs/demo-and-testbed.md)
    args = runtime.parse_args_or_demo(parser, argv, "difa", target=DEMO_REFERENCE, path_options=("clip_weights", "e4e", "clip_vocab"),
                                     iter=301, clip_mean_samples=1000,
                                     # the demo's own CLIP and e4e, trained on toy faces (demo/toyclip.py, demo/toye4e.py)
                                     clip_models="toy", clip_weights=os.path.join(runtime.DEMO_DIR, "toyclip.pt"), clip_model_weights="1.0",
                                     clip_vocab=os.path.join(runtime.DEMO_DIR, "toyclip_vocab.txt.gz"), prompt_template="a {} of a face",
                                     e4e=os.path.join(runtime.DEMO_DIR, "toye4e.pt"),
                                     # with the official lambda_scc 6 the toy e4e's consistency holds zero-shot DiFa at the source
                                     # (p(sketch) 0.0008 after 301 iterations, testbed's scorer; one-shot 0.77); 0.5 lets the toy
                                     # CLIP's direction through (0.64 zero-shot, 0.99 one-shot)
                                     psp_model_weight=0.5)
    runtime.check_common_args(args)
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
    if args.resume is None:
        given = runtime.explicit_options(parser, argv)
        wrong = [name for name in (DIFA_ONLY if args.baseline == "nada" else nada.OPTIONS) if name in given]
        if wrong:
            option = "--" + wrong[0].replace("_", "-")
            raise UserError(f"{option} is a DiFa option, unused by --baseline nada" if args.baseline == "nada"
                            else f"{option} is a StyleGAN-NADA option: add --baseline nada")
        if args.target_text is None and "source_text" in given:
            raise UserError("--source-text goes with --target-text (an image target's source is the mean of G_A samples)")
        if args.target_text is None and "prompt_template" in given:
            raise UserError("--prompt-template goes with --target-text")
    if args.prompt_template is not None and args.prompt_template.count("{}") != 1:
        raise UserError(f"--prompt-template needs exactly one {{}} where the text goes, got {args.prompt_template!r}")
    nada.check_args(args)
    if args.target_text is not None:
        if not args.target_text.strip() or not args.source_text.strip():
            raise UserError("--target-text and --source-text must not be empty")
        args.target = text_slug(args.target_text)  # names the run folder; no image is read
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD: the losses (pure functions)


def reference_direction(ref_emb, mu):
    """d = normalize(normalize(mean_r normalize(e_r)) - mu), the release's compute_img2img_direction.
    ref_emb [n, D] raw CLIP embeddings of the n references, mu [D] -> [D]; one reference: normalize(E(I_ref) - mu)."""
    # e_ref = normalize(mean_r e_r / |e_r|)
    target = F.normalize(F.normalize(ref_emb, dim=-1).mean(0), dim=-1)  # [D]
    # d = normalize(e_ref - mu)
    return F.normalize(target - mu, dim=-1, eps=1e-8)  # [D]


def text_direction(target_emb, source_emb):
    """d = normalize(mean_k (t_k - s_k)), NADA's compute_text_direction: target_emb, source_emb [T, D], the unit text
    embeddings of the same T templates filled with the target and the source text -> [D]. The template means are not
    re-normalised before the difference (NADA normalises each template's embedding, then averages)."""
    # d = normalize(mean_k t_k - mean_k s_k)
    return F.normalize((target_emb - source_emb).mean(0), dim=-1, eps=1e-8)  # [D]


def reference_tokens(tokens, mode):
    """T_ref from the block tokens of the n references [n, N, W]. first: the first reference's [N, W], which is
    what the release averages (its hooked list is not cleared between references, so each entry is image 1's);
    all (fix): the union of the n token sets [n N, W]."""
    if mode == "first":
        # T_ref = T_1
        return tokens[0]  # [N, W]
    # T_ref = T_1 u ... u T_n
    return tokens.reshape(-1, tokens.shape[-1])  # [n N, W]


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


@torch.no_grad()
def prompt_embeddings(text_tower, text, vocab, templates=NADA_TEMPLATES):
    """Unit CLIP text embeddings [T, D] of `text` filled into each template (NADA's get_text_features); templates
    ("{}",): the text alone [1, D] (what NADA's global_clip_loss tokenizes)."""
    prompts = [template.format(text) for template in templates]
    try:
        ids = tokenize(prompts, context_length=text_tower.context_length, vocab=vocab)  # [T, context]
    except RuntimeError:
        raise UserError(f"{text!r} in NADA's prompt templates is longer than CLIP's {text_tower.context_length} tokens") from None
    return F.normalize(text_tower(ids.long().to(text_tower.positional_embedding.device)), dim=-1)  # [T, D]


# ------------------------------------------------------------------------------------------------
# Training (the start-up, sample grids and checkpoints shared with nada.py)


def load_generators(args):
    """(device, G_A frozen, G_B: a frozen copy in train mode, the source checkpoint), after seeding."""
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)
    models, source_ckpt = load_checkpoint(args.source, require=("g_ema",), device=device)
    g_source = models["g_ema"]  # G_A, frozen
    common.requires_grad(g_source, False)
    generator = copy.deepcopy(g_source).train()  # G_B, frozen too until the caller picks what trains
    return device, g_source, generator, source_ckpt


def load_clip(args, device, local):
    """(CLIP image towers m, the raw embeddings [n, D] of the --target images and their block tokens T_ref (local),
    or the text directions d_m and text towers of --target-text) for each m."""
    clip_files = [resolve_clip_file(name, path) for name, path in zip(args.clip_models, args.clip_paths)]
    towers, ref_emb, ref_tokens, directions, text_towers = [], [], [], [], []
    for name, path in zip(args.clip_models, clip_files):
        tower = load_vision_tower(path).to(device)
        if local and args.clip_layer >= tower.depth:
            raise UserError(f"--clip-layer {args.clip_layer}: {name} has only {tower.depth} blocks")
        towers.append(tower)
    if args.target_text is not None:
        for name, path, tower in zip(args.clip_models, clip_files, towers):
            text_tower = load_text_tower(path).to(device)
            n_vocab, embed_dim = vocab_size(args.clip_vocab), text_tower.text_projection.shape[1]
            if n_vocab != text_tower.token_embedding.num_embeddings or embed_dim != tower.proj.shape[1]:
                raise UserError(f"{name}: the text tower of {path} ({text_tower.token_embedding.num_embeddings} tokens, {embed_dim}-d) does "
                                f"not fit the BPE vocabulary ({n_vocab} tokens) or the image tower ({tower.proj.shape[1]}-d)")
            templates = (args.prompt_template,) if args.prompt_template else NADA_TEMPLATES
            # d_m = normalize(mean_k t_k - mean_k s_k) over the templates k (NADA's, or --prompt-template)
            directions.append(text_direction(prompt_embeddings(text_tower, args.target_text, args.clip_vocab, templates),
                                             prompt_embeddings(text_tower, args.source_text, args.clip_vocab, templates)))
            text_towers.append(text_tower)
        return towers, ref_emb, ref_tokens, directions, text_towers
    references = common.list_images(args.target)
    with torch.no_grad():
        for tower in towers:
            x = torch.cat([load_reference(p, tower.resolution) for p in references]).to(device)
            emb, tokens = tower(x, return_layers=(args.clip_layer,) if local else ())
            ref_emb.append(emb)  # [n, D]
            if local:
                ref_tokens.append(reference_tokens(tokens[args.clip_layer], args.ref_tokens))  # [N, W] or [n N, W]
    return towers, ref_emb, ref_tokens, directions, text_towers


def start(args, run, g_source, generator, g_optim, queues, device):
    """(the --resume checkpoint or None, the grids' sample_z [S, D], mean_latent [1, D]); on resume G_B, Adam, queues, RNG loaded."""
    sample_z = torch.randn(args.n_sample, generator.style_dim, device=device)  # [S, D]
    with torch.no_grad():
        mean_latent = g_source.mean_latent(MEAN_LATENT_SAMPLES)  # [1, D], shared by both grid halves
    runtime.distribute(None, [g_optim])  # under torchrun the optimiser's step() averages the gradients
    state = run.resume_state()
    if state is not None:
        if "queues" not in state or "g_optim" not in state:
            raise UserError(f"{run.resume_path} was not written by difa.py (no SCC queues); cannot resume from it")
        try:
            generator.load_state_dict(state["g"])
            g_optim.load_state_dict(state["g_optim"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise UserError(f"the resume checkpoint does not match this run's models ({str(error).splitlines()[0][:200]})") from None
        queues.load_state_dict(state["queues"], device)
        sample_z, mean_latent = state["sample_z"].to(device), state["mean_latent"].to(device)
        runtime.set_rng_state(state["rng"])
        run.start = int(state["iter"])
    return state, sample_z, mean_latent


def sample_writer(args, run, g_source, generator, sample_z, mean_latent):
    """write_samples(i) for run.iterations: G_A's half of the grids once, one fixed noise for both halves."""
    fixed_noise = [getattr(g_source.noises, f"noise_{k}") for k in range(g_source.num_layers)]
    with torch.no_grad():
        source_samples = g_source([sample_z], truncation=args.sample_truncation, truncation_latent=mean_latent, noise=fixed_noise)[0].cpu()

    def write_samples(i):
        with torch.no_grad():  # no losses, no queue pushes
            adapted = generator([sample_z], truncation=args.sample_truncation, truncation_latent=mean_latent, noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)
    return write_samples


def checkpoint_state(args, source_ckpt, generator, g_optim, i_next, queues, sample_z, mean_latent, **extra):
    """The checkpoint: rosinality-shaped, g_ema = G_B itself (no EMA, as the release); `extra` after the source's d."""
    kept = {key: source_ckpt[key] for key in ("d", "extra_config") if key in source_ckpt}
    return {"g": generator.state_dict(), "g_ema": generator.state_dict(), **kept, **extra,
            "g_optim": g_optim.state_dict(), "args": runtime.args_to_dict(args), "run_args": args.run_args, "iter": i_next,
            "rng": runtime.get_rng_state(), "queues": queues.state_dict(), "sample_z": sample_z, "mean_latent": mean_latent}


def main(argv=None):
    args = parse_args(argv)
    if args.baseline == "nada":
        import nada  # here, not at the top: nada.py imports this file
        return nada.train(args)
    device, g_source, generator, source_ckpt = load_generators(args)
    text, latent_dim, n_latent = args.target_text is not None, generator.style_dim, generator.n_latent
    params = trainable_generator_parameters(generator)
    for p in params:
        p.requires_grad_(True)
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C

    # METHOD: CLIP towers; the reference embeddings and tokens, or the text directions; e4e
    antialias, local = not args.no_antialias, not text and args.lambda_partial != 0  # local: L_local, on reference tokens
    towers, ref_emb, ref_tokens, directions, _ = load_clip(args, device, local)
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

    # SHARED: --precision bf16 autocasts the generators; optimiser, sample latents, --resume
    runtime.autocast_forwards(args.precision, g_source, generator)
    g_optim = common.make_adam(params, args.lr, args.g_reg_every)
    queues = CodeQueues(args.sliding_window_size)
    state, sample_z, mean_latent = start(args, run, g_source, generator, g_optim, queues, device)
    if encoder is not None and state is not None and "e4e_buffers" in state:
        encoder.load_state_dict({**encoder.state_dict(), **state["e4e_buffers"]})

    # METHOD: an image target's directions d_m, with mu_m from the checkpoint on resume, else the cache or computed
    mus = None
    if not text:
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
                runtime.save_checkpoint(cache_path, {"key": key, "mu": [m.cpu() for m in mus]})
        directions = [reference_direction(e, m) for e, m in zip(ref_emb, mus)]  # d_m, each [D]
    write_samples = sample_writer(args, run, g_source, generator, sample_z, mean_latent)

    def checkpoint(i_next):
        extra = {}
        if encoder is not None and args.e4e_bn == "train":
            extra["e4e_buffers"] = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k or "num_batches" in k}
        if mus is not None:
            extra["clip_source_mean"] = [m.cpu() for m in mus]
        return checkpoint_state(args, source_ckpt, generator, g_optim, i_next, queues, sample_z, mean_latent, **extra)

    def e4e_codes(x):
        """The kept e4e codes [B, K] of the global batch from this process's rows x [B/N, 3, H, W]: each process encodes
        its rows, the codes gathered; with --e4e-bn train (BatchNorm pools the batch) every process encodes all images."""
        if args.e4e_bn == "train":
            return encoder(e4e_input(runtime.gather(x, args.batch), encoder.size, antialias))[:, :args.num_keep_first].flatten(1)
        return runtime.gather(encoder(e4e_input(x, encoder.size, antialias))[:, :args.num_keep_first].flatten(1), args.batch)

    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # METHOD: one w per sample, the same w for both generators, independent noise
        z = torch.randn(args.batch, latent_dim, device=device)
        with torch.no_grad():
            w = g_source.get_latent(z)  # [B, D]
            x_a, _ = runtime.generate_rows(g_source, [w], input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        x_b, _ = runtime.generate_rows(generator, [w], input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)

        # METHOD: global and local CLIP losses, tokens from the same forward as E(x_B)
        global_loss, local_loss, clip_total = (torch.zeros((), device=device) for _ in range(3))
        for m, (tower, weight, direction) in enumerate(zip(towers, args.clip_model_weights, directions)):
            with torch.no_grad():
                emb_a = F.normalize(tower(clip_input(x_a, tower.resolution, antialias))[0], dim=-1)
            emb_b, tokens = tower(clip_input(x_b, tower.resolution, antialias), return_layers=(args.clip_layer,) if local else ())
            g_m = global_clip_loss(F.normalize(emb_b, dim=-1), emb_a, direction)
            l_m = attentive_style_loss(tokens[args.clip_layer], ref_tokens[m]) if local else torch.zeros((), device=device)
            clip_total = clip_total + weight * args.lambda_direction * (g_m + args.lambda_partial * l_m)
            global_loss, local_loss = global_loss + weight * g_m.detach(), local_loss + weight * l_m.detach()

        # METHOD: selective cross-domain consistency (queues filled every step, ramped weight). Under torchrun the queues hold
        # the gathered global batch's codes (autograd flows back to each process's rows), so every process computes the
        # single-process L_scc (runtime.py,
        # 'Several processes'; in one process gather returns its input)
        ramp = scc_ramp(i, args.iter, args.sliding_window_size)
        scc = torch.zeros((), device=device)
        if encoder is not None:
            with torch.no_grad():
                codes_a = e4e_codes(x_a)  # [B, K]
            with torch.set_grad_enabled(ramp > 0):
                codes_b = e4e_codes(x_b)  # [B, K]
            queues.push(codes_a, codes_b)
            scc = scc_loss(codes_b, codes_a, scc_mask(queues.delta_w(), args.psp_alpha))
        loss = clip_total + args.psp_model_weight * ramp * scc
        g_optim.zero_grad(set_to_none=True)
        loss.backward()
        g_optim.step()

        # SHARED: the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        logged = {"loss": loss.item(), "global": global_loss.item(), **({} if text else {"local": local_loss.item()})}
        run.end_iteration(i, {**logged, "scc": scc.item(), "scc_ramp": ramp})
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
