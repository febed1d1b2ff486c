"""The baselines of the few-shot adaptation papers' tables, one file: TGAN, TGAN+ADA, FreezeD, EWC, BSA, MineGAN.

Every paper this project implements (CDC Tables 1-2 and supplement Table 4, C3, progressive ASC Table 1)
compares against the same earlier transfer methods. `python baselines.py --baseline NAME` runs one of them on
the shared StyleGAN2 with the CLI, outputs, resume and Ctrl-C of the method files. Five of them are GAN
fine-tuning and run cdc.py's loop line for line with CDC's own parts removed (no L_dist, no anchors, no patch
head: an image-level D on every iteration, z ~ p_z with style mixing); each adds one thing, marked METHOD:

  tgan     Wang et al., "Transferring GANs: generating images from limited data", ECCV 2018.
           Plain fine-tuning of G and D from the source with the source objective:
               min_G max_D  E_x[log D(x)] + E_z[log(1 - D(G(z)))]   (non-saturating G loss, R1, path length)
           The same objective and loop as `cdc.py --no-dist --adv image` (which still works); the two differ
           only in their random draws (cdc.py also draws a patch head and anchors it then leaves unused).
  ada      TGAN+ADA: Karras et al., "Training Generative Adversarial Networks with Limited Data", NeurIPS 2020.
           Fine-tuning where every image D sees (reals, fakes, the R1 reals) first passes through the
           non-leaking augmentation pipeline A_p: each transform of the set (ADA's default `bgc`: x-flip, 90°
           rotations, integer translation; isotropic scaling, arbitrary rotation, anisotropic scaling,
           fractional translation; brightness, contrast, luma flip, hue rotation, saturation) is applied to
           each image with probability p. p starts at 0 and is adjusted every `ada_interval` D steps from the
           overfitting heuristic r_t = E[sign(D(x_real))] over every real D saw since the last update (the main
           step's and, on R1 steps, the R1 step's: ADA's loss.py reports both; --ada-rt-main-only counts the first):
               p <- max(0, p + sign(r_t - target) * batch * interval / (ada_kimg * 1000))
           so p can move by at most 1 per ada_kimg thousand real images (target 0.6, interval 4, ada_kimg 100: ADA's
           train.py sets 100 when it starts from a pretrained network, as every run here does, 500 from scratch). At
           batch 4 p moves by at most 0.2 in 5002 iterations, 0.06 in the demo's 1500.
           The CDC paper notes that ADA's 90° rotations leak into generated caricatures: --ada-exclude rotate90
           switches single transforms off, --ada-pipe picks another of ADA's sets.
  freezed  Mo et al., "Freeze the Discriminator: a Simple Baseline for Fine-Tuning GANs", CVPRW 2020.
           Fine-tuning with the first K blocks of D, counted from the input (FromRGB and the K highest-
           resolution ResBlocks), frozen: min_G max_{D_{>K}} (same objective), D_{<=K} = D_s.
  ewc      Li et al., "Few-shot Image Generation with Elastic Weight Consolidation", NeurIPS 2020.
           Fine-tuning with a penalty on moving the generator weights that mattered for the source:
               L_G' = L_G + lambda sum_i F_i (theta_i - theta_s,i)^2,
               F_i  = E[(d L(X | theta_s) / d theta_s,i)^2],  L(X | theta_s) = -log sigmoid(D_s(G_s(z)))
           F is the diagonal (empirical) Fisher information of the source G, with the log-likelihood of a
           generated image approximated by the source D's binary cross-entropy (the paper: F = E[-d^2 L(X | theta_s)
           / d theta_s^2], L computed as that BCE); as an expectation over samples it is estimated from each
           sample's squared gradient, so F and the strength of a fixed lambda do not depend on --batch
           (--ewc-fisher batch-mean: the squared gradient of each batch's mean loss, 1/batch as large, what this
           project did before and public re-implementations do). Estimated once before training on
           `ewc_fisher_batches` batches drawn from its own seeded generator (so --ewc-weight 0 reproduces
           --baseline tgan bit for bit; a resumed run recomputes it, the same values on the same device). No official
           code; lambda = 5e8 is the value reported for the paper, not checked against the PDF.
  minegan  Wang et al., "MineGAN: effective knowledge transfer from GANs to target domains with few images",
           CVPR 2020. Miners are put in front of the generator and the adversarial game is played first by the
           miners alone (G frozen: "mining" the source for what is closest to the target) for `miner_iters`
           iterations, then by the miners and G jointly. As the official StyleGAN2 code (yaxingwang/MineGAN,
           styleGANv2/model.py, train.py) there are two: M = Linear(512, 512) - ReLU - Linear(512, 512) in front of
           the mapping network, G(M(z)), and a randomly initialised convolutional network (InputMiner: a learned
           8-channel 4x4 constant, 1x1 convolutions 8 -> 32 -> 128 -> 512) whose output replaces G's learned constant
           input, so the first samples are not the source's faces (--no-input-miner keeps the constant). G joins at
           iteration 1001 (official: i > 1000). The official train.py never clears the miners' gradients (only G's
           zero_grad is called), so each Adam step of a miner follows the running sum of all its past gradients,
           the path-length term's included: reproduced by default as an official-code bug, --miner-zero-grad clears
           them before each step. It also leaves the source run's Adam moments out (commented out there): so here.
           CDC's supplement reports also trying smaller miners (--miner-hidden; as quoted in this project's issue,
           not checked against the PDF).

  bsa      Noguchi & Harada, "Image Generation From Small Datasets via Batch Statistics Adaptation", ICCV 2019.
           No discriminator: the generator's weights stay frozen and only per-channel scale gamma and shift
           beta of its intermediate features, plus one latent z_n per training image, are learned, by
           reconstructing the training images:
               min_{gamma, beta, z}  sum_n |G(z_n + eps) - x_n|_1 + lambda_per LPIPS(G(z_n + eps), x_n)
                                     + lambda_emd EMD({z_n}, N(0, I)) + lambda_re sum_l (|gamma_l - 1|^2 + |beta_l|^2)
           (eps ~ N(0, 0.01^2 I); EMD is the official code's nearest-neighbour distance between the batch's z and
           10x as many Gaussian samples, in both directions). New images are G(z), z ~ N(0, I).
           The official code has two configurations; this is its SNGAN one (configs/default.yml, gen_models/
           ada_generator.py AdaSNGAN): per-channel gamma, beta of every BatchNorm (initialised from the pretrained
           ones), regulariser mean((gamma - 1)^2) + mean(beta^2) per layer, Adam lr 0.03 for gamma, beta and z, batch
           min(N, 25), lr x0.2 every 3000 of 10000 iterations. (Its BigGAN configuration adapts something else: a
           scale and shift of the first linear layer's 4x4 output, the linear layers of each HyperBN that compute its
           gamma, beta from z and the class embedding, and a Linear(1, 128) standing in for that embedding, regularising
           only the latter's weight; Adam 0.0005, z 0.05, batch 5 per GPU.)
           Mapping onto StyleGAN2: SNGAN's BatchNorm affine (gamma, beta) sits right after a normalisation and
           before the nonlinearity. StyleGAN2 has no BatchNorm; its
           normalisation is the weight demodulation of every styled conv (each output channel is rescaled to
           unit expected variance). So gamma, beta [C] act on the output of each StyledConv's modulated,
           demodulated convolution, before noise, bias and leaky ReLU (conv1 and every conv of `convs`; not the
           ToRGB layers, which have no demodulation, as BigGAN's last conv has no BN after it). They are forward
           hooks on the ModulatedConv2d modules, so G's code and state dict are untouched; the checkpoint stores
           them as `scale_shift` next to the unchanged g_ema, and `adapted_generator` re-installs them. z lives
           in Z (the mapping's input), drawn from N(0, I) at the start (the official runs start at 0, initial_z "zero",
           which StyleGAN2's PixelNorm would turn into one degenerate direction). The perceptual term is
           LPIPS-VGG (as rssa.py; the official code uses an L1 distance of raw VGG16 activations weighted
           0.001). Not mapped: BigGAN's class-embedding linear layer (StyleGAN2 is unconditional).

Defaults: the GAN baselines use the schedule of cdc.py (the loop they share: 5002 iterations, batch 4, lr 0.002,
R1 10 every 16, path length 2 every 4, mixing 0.9, EMA 0.5^(32/10000)), the source run's Adam moments and, as
in cdc.py, G_s = the source's `g`, g_ema from its `g_ema`. BSA uses its official SNGAN configuration (10000
iterations, batch min(N, 25), Adam lr 0.03 for gamma, beta and z, x0.2 every 3000 iterations) and starts from the
source's g_ema. MineGAN starts Adam from zero moments, as its official code. Each --help line says where its default comes from.
"""

import argparse
import copy
import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
import runtime
from common import UserError
from checkpoints import load_checkpoint
from stylegan2 import ConstantInput, EqualConv2d, FusedLeakyReLU, upfirdn2d

BASELINES = ("tgan", "ada", "freezed", "ewc", "bsa", "minegan")
# per-baseline defaults of the shared options (None in argparse, filled in after parsing)
GAN_DEFAULTS = dict(iter=5002, batch=4, lr=0.002)  # cdc.py's official schedule, the loop these baselines share
# BSA's SNGAN configuration (configs/default.yml: iteration, batchsize SNGAN, init_lr; AdaSNGAN's Adam for every parameter)
BSA_DEFAULTS = dict(iter=10000, batch=25, lr=0.03)
BSA_LR_DECAY_EVERY, BSA_LR_DECAY = 3000, 0.2  # official exponential_shift_interval 3000, lr_scale 0.2
BSA_Z_EPS = 0.01  # official AdaGenerator: z_n + N(0, 0.01^2) at every step
BSA_EMD_SAMPLES = 10  # official EMD: 10 Gaussian samples per batch latent

# ADA's augmentation sets (stylegan2-ada-pytorch augpipe_specs) restricted to the implemented transforms; the
# probability multipliers are all 1, the ranges those of its AugmentPipe defaults
ADA_BLIT = ("xflip", "rotate90", "xint")
ADA_GEOM = ("scale", "rotate", "aniso", "xfrac")
ADA_COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
ADA_PIPES = {"blit": ADA_BLIT, "geom": ADA_GEOM, "color": ADA_COLOR, "bg": ADA_BLIT + ADA_GEOM, "bgc": ADA_BLIT + ADA_GEOM + ADA_COLOR}
ADA_RANGES = dict(xint_max=0.125, scale_std=0.2, rotate_max=1.0, aniso_std=0.2, xfrac_std=0.125,
                  brightness_std=0.2, contrast_std=0.5, hue_max=1.0, saturation_std=1.0)
# ADA's low-pass filter for geometric transforms: the sym6 wavelet's decomposition filter
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="the baselines of the few-shot adaptation papers: TGAN, TGAN+ADA, FreezeD, EWC, BSA, MineGAN")
    runtime.add_common_args(parser, origin="cdc.py's official schedule for tgan/ada/freezed/ewc/minegan, BSA's official config for bsa")
    parser.set_defaults(iter=None, batch=None, lr=None)  # None: the baseline's (module docstring)
    parser.add_argument("--baseline", choices=BASELINES, default="tgan", help="which baseline (default tgan: plain fine-tuning)")
    # METHOD: ADA
    parser.add_argument("--ada-pipe", choices=sorted(ADA_PIPES), default="bgc", help="ADA's augmentation set (default bgc: ADA's default)")
    parser.add_argument("--ada-exclude", default="",
                        help="comma-separated transforms of the set to switch off, e.g. rotate90, which the CDC paper finds leaks into "
                             "caricatures (default none: ADA)")
    parser.add_argument("--ada-target", type=float, default=0.6, help="target of r_t = E[sign D(x_real)] (default 0.6: ADA)")
    parser.add_argument("--ada-kimg", type=float, default=100,
                        help="thousands of real images for p to move by 1 (default 100: ADA's train.py when it starts from a pretrained "
                             "network, as every run here does; 500 from scratch)")
    parser.add_argument("--ada-interval", type=int, default=4, help="D steps between p updates (default 4: ADA's ada_interval)")
    parser.add_argument("--ada-p", type=float, default=0.0, help="initial augmentation probability (default 0: ADA)")
    parser.add_argument("--ada-fixed", action="store_true", help="keep p at --ada-p (ADA's --aug=fixed; default: adaptive)")
    parser.add_argument("--ada-rt-main-only", action="store_true",
                        help="r_t from the main D step's reals only (default: also the R1 step's reals, as ADA's loss.py reports both)")
    # METHOD: FreezeD
    parser.add_argument("--freeze-d", type=int, default=None,
                        help="K, D blocks frozen from the input: FromRGB and the K highest-resolution ResBlocks (default: those above 16x16, "
                             "log2(size) - 4, i.e. 4 at 256 px: FreezeD's StyleGAN runs train only the last 3 of 7 D blocks, "
                             "--feature_loc 3; FreezeD has no StyleGAN2 runs)")
    # METHOD: EWC
    parser.add_argument("--ewc-weight", type=float, default=5e8,
                        help="lambda, weight of the EWC penalty (default 5e8: the EWC paper, as recalled; not checked against the PDF)")
    parser.add_argument("--ewc-fisher-batches", type=int, default=64,
                        help="batches (of --batch samples) for the Fisher estimate (default 64: unstated in the paper, our choice)")
    parser.add_argument("--ewc-fisher", choices=["per-sample", "batch-mean"], default="per-sample",
                        help="F_i as the mean of each generated sample's squared gradient (default per-sample: the paper's expectation, "
                             "independent of --batch) or of each batch-mean loss's (batch-mean: scales as 1/--batch; this project before, "
                             "and public re-implementations)")
    # METHOD: MineGAN
    parser.add_argument("--miner-hidden", type=int, default=None,
                        help="width of the miner's hidden layer (default: the style dim, 512 at full scale: official StyleGAN2 code; "
                             "CDC's supplement reports also trying smaller miners)")
    parser.add_argument("--miner-iters", type=int, default=1001,
                        help="iterations that train the miners alone before G joins (default 1001: official StyleGAN2 code, G trains "
                             "when i > step_dis = 1000)")
    parser.add_argument("--no-input-miner", action="store_true",
                        help="keep G's learned constant input (default: replace it by the official code's second, convolutional miner)")
    parser.add_argument("--miner-zero-grad", action="store_true",
                        help="clear the miners' gradients before each of their steps (default: never cleared, as the official train.py, "
                             "whose Adam steps follow the running sum of all past gradients: an official-code bug, kept by default)")
    # METHOD: BSA
    parser.add_argument("--bsa-latent-lr", type=float, default=0.03,
                        help="Adam lr of the per-image latents (default 0.03: official SNGAN configuration, init_lr for every parameter; "
                             "its BigGAN configuration uses 0.05)")
    parser.add_argument("--bsa-perceptual", type=float, default=1.0,
                        help="lambda_per, weight of LPIPS-VGG (default 1: our choice; the official L1 of raw VGG16 activations uses 0.001)")
    parser.add_argument("--bsa-emd", type=float, default=0.1, help="lambda_emd, weight of the latents' EMD to N(0, I) (default 0.1: official l_emd)")
    parser.add_argument("--bsa-reg", type=float, default=0.02, help="lambda_re, weight of |gamma - 1|^2 + |beta|^2 (default 0.02: official l_re)")
    parser.add_argument("--lpips-net", choices=["vgg", "toy"], default="vgg",
                        help="the perceptual distance: vgg, LPIPS-VGG (default: our choice, as rssa.py; needs torchvision's VGG16 weights) "
                             "or toy, the demo's toy network (demo/toynet.py, LPIPS-style; the demo's default)")
    parser.add_argument("--lpips-random-backbone", action="store_true", help="tests only: LPIPS with a randomly initialised VGG instead of the pretrained one")
    # SHARED: StyleGAN2 regularisers, as rosinality / CDC's official code
    parser.add_argument("--r1", type=float, default=10, help="R1 weight gamma (default 10: official code)")
    parser.add_argument("--path-regularize", type=float, default=2, help="path-length weight (default 2: official code)")
    parser.add_argument("--path-batch-shrink", type=int, default=2, help="path-length batch divisor (default 2: official code)")
    parser.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (default 16: official code)")
    parser.add_argument("--g-reg-every", type=int, default=4, help="lazy path-length interval (default 4: official code)")
    parser.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability (default 0.9: official code)")
    parser.add_argument("--ignore-source-optim", action="store_true",
                        help="start Adam from zero moments instead of the source run's g_optim/d_optim (official CDC code: loaded when present; "
                             "minegan never loads them, as MineGAN's official train.py)")
    args = runtime.parse_args_or_demo(parser, argv, "baselines", run_name=lambda a: a.baseline, **runtime.DEMO_SCHEDULE, lpips_net="toy")
    defaults = BSA_DEFAULTS if args.baseline == "bsa" else GAN_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    runtime.check_common_args(args)
    if args.baseline != "bsa":
        runtime.check_discriminator_batch(args.batch)
    ada_transforms(args.ada_pipe, args.ada_exclude)  # one-line error for an unknown transform
    if not 0 <= args.ada_p or args.ada_kimg <= 0 or args.ada_interval < 1:
        raise UserError("--ada-p must be >= 0, --ada-kimg positive and --ada-interval at least 1")
    if args.freeze_d is not None and args.freeze_d < 0:
        raise UserError(f"--freeze-d must be at least 0, got {args.freeze_d}")
    if args.ewc_weight < 0 or args.ewc_fisher_batches < 1:
        raise UserError("--ewc-weight must be >= 0 and --ewc-fisher-batches at least 1")
    if args.miner_iters < 0 or (args.miner_hidden is not None and args.miner_hidden < 1):
        raise UserError("--miner-iters must be >= 0 and --miner-hidden at least 1")
    if min(args.bsa_latent_lr, args.bsa_perceptual, args.bsa_emd, args.bsa_reg) < 0:
        raise UserError("the --bsa-* weights and rates must be >= 0")
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD (ada): the non-leaking augmentation pipeline and its p update


def ada_transforms(pipe, exclude=""):
    """(transforms applied, transforms switched off) of an ADA set minus the comma-separated `exclude`."""
    names = ADA_PIPES[pipe]
    excluded = tuple(n for n in exclude.split(",") if n)
    unknown = [n for n in excluded if n not in names]
    if unknown:
        raise UserError(f"--ada-exclude {exclude}: {', '.join(unknown)} not in the {pipe} set ({', '.join(names)})")
    return tuple(n for n in names if n not in excluded), excluded


def ada_draw(batch, p, transforms, device="cpu"):
    """The random parameters of one ADA pass: {transform: values [B] or [B, 2]} and {transform: applied mask [B]}.

    Drawn in ADA's order, each transform applied to each image with probability p (the rotation twice, before
    and after the anisotropic scaling, each with 1 - sqrt(1 - p), so that one of them happens with probability
    p). Values where not applied are the identity's.
    """
    r = ADA_RANGES
    params, applied = {}, {}

    def chance(name, prob=None):
        mask = torch.rand(batch, device=device) < (p if prob is None else prob)  # [B]
        applied[name] = mask
        return mask

    if "xflip" in transforms:
        i = torch.floor(torch.rand(batch, device=device) * 2)  # 0 or 1
        params["xflip"] = torch.where(chance("xflip"), i, torch.zeros_like(i))
    if "rotate90" in transforms:
        k = torch.floor(torch.rand(batch, device=device) * 4)  # quarter turns 0..3
        params["rotate90"] = torch.where(chance("rotate90"), k, torch.zeros_like(k))
    if "xint" in transforms:
        t = (torch.rand(batch, 2, device=device) * 2 - 1) * r["xint_max"]  # fraction of the image size
        params["xint"] = torch.where(chance("xint")[:, None], t, torch.zeros_like(t))
    if "scale" in transforms:
        s = torch.exp2(torch.randn(batch, device=device) * r["scale_std"])
        params["scale"] = torch.where(chance("scale"), s, torch.ones_like(s))
    p_rot = 1 - math.sqrt(max(1 - p, 0.0))  # P(pre or post rotation) = p
    if "rotate" in transforms:
        theta = (torch.rand(batch, device=device) * 2 - 1) * math.pi * r["rotate_max"]
        params["rotate_pre"] = torch.where(chance("rotate_pre", p_rot), theta, torch.zeros_like(theta))
    if "aniso" in transforms:
        s = torch.exp2(torch.randn(batch, device=device) * r["aniso_std"])
        params["aniso"] = torch.where(chance("aniso"), s, torch.ones_like(s))
    if "rotate" in transforms:
        theta = (torch.rand(batch, device=device) * 2 - 1) * math.pi * r["rotate_max"]
        params["rotate_post"] = torch.where(chance("rotate_post", p_rot), theta, torch.zeros_like(theta))
    if "xfrac" in transforms:
        t = torch.randn(batch, 2, device=device) * r["xfrac_std"]
        params["xfrac"] = torch.where(chance("xfrac")[:, None], t, torch.zeros_like(t))
    if "brightness" in transforms:
        b = torch.randn(batch, device=device) * r["brightness_std"]
        params["brightness"] = torch.where(chance("brightness"), b, torch.zeros_like(b))
    if "contrast" in transforms:
        c = torch.exp2(torch.randn(batch, device=device) * r["contrast_std"])
        params["contrast"] = torch.where(chance("contrast"), c, torch.ones_like(c))
    if "lumaflip" in transforms:
        i = torch.floor(torch.rand(batch, device=device) * 2)
        params["lumaflip"] = torch.where(chance("lumaflip"), i, torch.zeros_like(i))
    if "hue" in transforms:
        theta = (torch.rand(batch, device=device) * 2 - 1) * math.pi * r["hue_max"]
        params["hue"] = torch.where(chance("hue"), theta, torch.zeros_like(theta))
    if "saturation" in transforms:
        s = torch.exp2(torch.randn(batch, device=device) * r["saturation_std"])
        params["saturation"] = torch.where(chance("saturation"), s, torch.ones_like(s))
    return params, applied


def _mat(rows, like):
    """[B, n, n] from nested lists of [B] tensors and Python numbers."""
    return torch.stack([torch.stack([v if torch.is_tensor(v) else torch.full_like(like, float(v)) for v in row], -1)
                        for row in rows], -2)


def _translate2d(tx, ty):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx, sy):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(theta):
    return _mat([[torch.cos(theta), -torch.sin(theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1]], theta)


def ada_geometric_matrix(params, width, height):
    """G_inv [B, 3, 3]: output pixel (x, y, 1) -> input pixel, centred coordinates, composed as ADA does:
    G_inv = F^-1 R90^-1 T_int^-1 S^-1 R_pre^-1 A^-1 R_post^-1 T_frac^-1 (each factor the inverse of its transform)."""
    batch = next(iter(params.values())).shape[0]
    like = next(iter(params.values())).new_zeros(batch)
    g_inv = torch.eye(3, device=like.device).expand(batch, 3, 3)
    if "xflip" in params:  # x -> -x
        g_inv = g_inv @ _scale2d(1 - 2 * params["xflip"], like + 1)
    if "rotate90" in params:  # rotation by k quarter turns; inverse: rotate by -k
        g_inv = g_inv @ _rotate2d(math.pi / 2 * params["rotate90"])
    if "xint" in params:  # whole-pixel shift by round(t W), round(t H)
        t = params["xint"]
        g_inv = g_inv @ _translate2d(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height))
    if "scale" in params:
        s = params["scale"]
        g_inv = g_inv @ _scale2d(1 / s, 1 / s)
    if "rotate_pre" in params:
        g_inv = g_inv @ _rotate2d(params["rotate_pre"])
    if "aniso" in params:
        s = params["aniso"]
        g_inv = g_inv @ _scale2d(1 / s, s)
    if "rotate_post" in params:
        g_inv = g_inv @ _rotate2d(params["rotate_post"])
    if "xfrac" in params:
        t = params["xfrac"]
        g_inv = g_inv @ _translate2d(-t[:, 0] * width, -t[:, 1] * height)
    return g_inv


def ada_color_matrix(params):
    """C [B, 4, 4]: homogeneous RGB (r, g, b, 1) -> transformed colour, composed in ADA's order (brightness,
    contrast, luma flip, hue rotation about the luma axis v = (1, 1, 1) / sqrt 3, saturation)."""
    batch = next(iter(params.values())).shape[0]
    like = next(iter(params.values())).new_zeros(batch)
    eye = torch.eye(4, device=like.device)
    c = eye.expand(batch, 4, 4)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=like.device) / math.sqrt(3)  # luma axis
    vv = torch.outer(v, v)  # [4, 4]
    if "brightness" in params:  # rgb + b
        b = params["brightness"]
        c = _mat([[1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]], b) @ c
    if "contrast" in params:  # rgb * c
        s = params["contrast"]
        c = _mat([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s) @ c
    if "lumaflip" in params:  # Householder reflection across the plane orthogonal to v: I - 2 v v^T
        c = (eye - 2 * vv * params["lumaflip"][:, None, None]) @ c
    if "hue" in params:  # Rodrigues rotation by theta about v
        theta = params["hue"]
        s, co = torch.sin(theta), torch.cos(theta)
        cc = 1 - co
        vx = vy = vz = 1 / math.sqrt(3)
        c = _mat([[vx * vx * cc + co, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                  [vy * vx * cc + vz * s, vy * vy * cc + co, vy * vz * cc - vx * s, 0],
                  [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + co, 0],
                  [0, 0, 0, 1]], theta) @ c
    if "saturation" in params:  # keep the luma component, scale the chroma by s
        s = params["saturation"][:, None, None]
        c = (vv + (eye - vv) * s) @ c
    return c


def ada_apply_geometric(images, g_inv):
    """Resample images [B, C, H, W] by G_inv as ADA does: reflect-pad by the margin the transformed corners need,
    upsample 2x with the sym6 low-pass filter, bilinear grid sample, low-pass and downsample 2x, crop."""
    batch, channels, height, width = images.shape
    f = torch.tensor(SYM6, device=images.device)
    f = f / f.sum()
    hz_pad = len(SYM6) // 4  # 3
    # margin: how far outside the image the corners of the output map to (plus the filter's support)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=images.device).t()  # [3, 4]
    mapped = (g_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [2 (x, y), B * 4]
    margin = torch.cat([-mapped, mapped]).max(1).values  # [x0, y0, x1, y1]
    margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, device=images.device)
    margin = margin.clamp(min=0).minimum(torch.tensor([width - 1, height - 1] * 2, device=images.device, dtype=margin.dtype))
    mx0, my0, mx1, my1 = (int(m) for m in margin.ceil().tolist())
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    g_inv = _translate2d(torch.full((batch,), (mx0 - mx1) / 2, device=images.device),
                         torch.full((batch,), (my0 - my1) / 2, device=images.device)) @ g_inv
    # 2x upsampling: zero insertion + the filter (gain 4), output [B, C, 2H', 2W']
    kernel = torch.outer(f, f)  # [12, 12], separable, sum 1
    images = upfirdn2d(images, kernel * 4, up=2, pad=((len(SYM6) + 1) // 2, (len(SYM6) - 2) // 2))
    ones = torch.ones(batch, device=images.device)
    g_inv = _scale2d(2 * ones, 2 * ones) @ g_inv @ _scale2d(ones / 2, ones / 2)
    g_inv = _translate2d(-0.5 * ones, -0.5 * ones) @ g_inv @ _translate2d(0.5 * ones, 0.5 * ones)
    # bilinear sampling on [-1, 1] coordinates of the output grid [B, C, 2(H + 2 pad), 2(W + 2 pad)]
    shape = [batch, channels, (height + hz_pad * 2) * 2, (width + hz_pad * 2) * 2]
    g_inv = (_scale2d(2 / images.shape[3] * ones, 2 / images.shape[2] * ones) @ g_inv
             @ _scale2d(shape[3] / 2 * ones, shape[2] / 2 * ones))
    grid = F.affine_grid(g_inv[:, :2, :], shape, align_corners=False)  # [B, h, w, 2]
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # low-pass (correlation with the filter, i.e. ADA's flip_filter=True) and keep every second sample, crop 2 pad
    flipped = torch.outer(f.flip(0), f.flip(0))
    return upfirdn2d(images, flipped, down=2, pad=(-hz_pad * 2 + (len(SYM6) - 1) // 2, -hz_pad * 2 + (len(SYM6) - 2) // 2))


def ada_apply_color(images, c):
    """rgb' = C[:3, :3] rgb + C[:3, 3] per image: images [B, 3, H, W], C [B, 4, 4]."""
    batch, channels, height, width = images.shape
    flat = images.reshape(batch, channels, height * width)  # [B, 3, HW]
    return (c[:, :3, :3] @ flat + c[:, :3, 3:]).reshape(batch, channels, height, width)


def ada_augment(images, p, transforms):
    """A_p(images): ADA's pipeline with probability p per transform and image. p = 0 returns the images as
    they are (no draw, no resampling); geometric resampling runs only when some image has a geometric change."""
    if p <= 0 or not transforms:
        return images
    params, _ = ada_draw(images.shape[0], p, transforms, images.device)
    geometric = {k: v for k, v in params.items() if k not in ADA_COLOR}
    colour = {k: v for k, v in params.items() if k in ADA_COLOR}
    if geometric:
        g_inv = ada_geometric_matrix(geometric, images.shape[3], images.shape[2])
        if not torch.equal(g_inv, torch.eye(3, device=images.device).expand_as(g_inv)):
            images = ada_apply_geometric(images, g_inv)
    if colour:
        images = ada_apply_color(images, ada_color_matrix(colour))
    return images


def count_signs(signs, real_logits):
    """(sum, count) of sign(D(x_real)) since the last p update, plus those of `real_logits` [B] or [B, 1]."""
    return [signs[0] + float(real_logits.sign().sum()), signs[1] + real_logits.numel()]


def ada_update_p(p, real_signs_mean, target, batch, interval, kimg):
    """ADA's heuristic: p + sign(r_t - target) * (batch * interval) / (kimg * 1000), floored at 0;
    r_t = E[sign(D(x_real))] over the last `interval` D steps."""
    step = batch * interval / (kimg * 1000)
    return max(0.0, p + float(np.sign(real_signs_mean - target)) * step)


# ------------------------------------------------------------------------------------------------
# METHOD (freezed): which discriminator parameters stay frozen


def freezed_parameter_names(discriminator, k):
    """Names of D's parameters FreezeD keeps at the source's values: FromRGB (convs.0) and the first k ResBlocks
    (convs.1 .. convs.k, the highest resolutions); nothing for k = 0."""
    n_blocks = len(discriminator.convs) - 1
    if not 0 <= k <= n_blocks:
        raise UserError(f"--freeze-d {k}: this {discriminator.size}-px discriminator has {n_blocks} blocks after FromRGB (use 0..{n_blocks})")
    prefixes = tuple(f"convs.{b}." for b in range(k + 1)) if k > 0 else ()
    return {name for name, _ in discriminator.named_parameters() if name.startswith(prefixes)}


def default_freeze_d(size):
    """FreezeD's StyleGAN choice expressed in resolutions: freeze the blocks working above 16x16 (log2(size) - 4)."""
    return max(0, int(math.log2(size)) - 4)


def set_d_trainable(discriminator, flag, frozen):
    for name, parameter in discriminator.named_parameters():
        parameter.requires_grad_(flag and name not in frozen)


# ------------------------------------------------------------------------------------------------
# METHOD (ewc): diagonal Fisher information and the penalty


def fisher_diagonal(params, batch_losses):
    """F_i = mean over the losses k of (d L_k / d theta_i)^2 (the diagonal empirical Fisher information).
    params: list of tensors requiring grad; batch_losses: iterable of scalar losses built from them (several
    losses may share one graph, e.g. the samples of one batch: each gradient keeps the graph for the next)."""
    fisher = [torch.zeros_like(p) for p in params]
    n = 0
    for loss in batch_losses:
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                # sum_k (d L_k / d theta_i)^2
                f.add_(g.detach().pow(2))
        n += 1
    # F_i = (1 / K) sum_k (d L_k / d theta_i)^2
    return [f / n for f in fisher]


def ewc_penalty(params, source_params, fisher):
    """sum_i F_i (theta_i - theta_s,i)^2 over all parameters (without lambda)."""
    # sum_i F_i (theta_i - theta_s,i)^2
    return sum((f * (p - s).pow(2)).sum() for p, s, f in zip(params, source_params, fisher))


def estimate_fisher(g_source, d_source, n_batches, batch, seed, device, per_sample=True):
    """The source generator's diagonal Fisher information {name: F} from the source D's loss on n_batches
    generated batches, z ~ N(0, I) without mixing, random per-pixel noise. per_sample (the paper's F, an
    expectation over samples, whatever the batch): one loss per sample, L_b = -log sigmoid(D_s(G_s(z_b))) (D sees
    the whole batch, as in training: its minibatch stddev); otherwise one per batch, L_k = mean_b L_b, whose squared
    gradient shrinks as 1 / batch. Runs on its own RNG stream seeded by `seed`, restoring every global RNG state."""
    g = copy.deepcopy(g_source).requires_grad_(True)
    d = copy.deepcopy(d_source).requires_grad_(False)
    names, params = zip(*g.named_parameters())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)

        def losses():
            for _ in range(n_batches):
                images, _ = g([torch.randn(batch, g.style_dim, device=device)])
                logits = d(images)  # [B, 1]
                if per_sample:
                    # L_b = -log sigmoid(D(G(z_b))) = BCE with the 'real' label, one per sample
                    yield from (common.g_nonsaturating_loss(logit) for logit in logits)
                else:
                    yield common.g_nonsaturating_loss(logits)  # mean_b L_b

        fisher = fisher_diagonal(list(params), losses())
    return dict(zip(names, fisher))


# ------------------------------------------------------------------------------------------------
# METHOD (minegan): the miner


class Miner(nn.Module):
    """MineGAN's miner for StyleGAN2: u = W2 relu(W1 z + b1) + b2, in front of the mapping network (the official
    styleGANv2/model.py Miner: two nn.Linear with PyTorch's default initialisation, hidden width = style dim)."""

    def __init__(self, dim, hidden=None):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, hidden or dim), nn.ReLU(), nn.Linear(hidden or dim, dim))

    def forward(self, zs):
        return [self.transform(z) for z in zs]  # one mined code per z of a style-mixing list


class InputMiner(nn.Module):
    """MineGAN's second miner for StyleGAN2 (the official styleGANv2/model.py Miner_semantic_conv): a small
    randomly initialised network that replaces G's learned constant input, u_4x4 = conv3(lrelu(conv2(lrelu(conv1(c))))),
    c a learned [1, 8, 4, 4] constant, 1x1 equalised convolutions 8 -> 32 -> 128 -> C (C = G's 4x4 channels, 512 at
    full scale), the first two with a bias and StyleGAN2's scaled leaky ReLU. `install(g)` hooks it onto g.input."""

    def __init__(self, channels, code_dim=8):
        super().__init__()
        self.input = ConstantInput(code_dim)
        self.conv1 = EqualConv2d(code_dim, code_dim * 4, 1, bias=False)
        self.act1 = FusedLeakyReLU(code_dim * 4)
        self.conv2 = EqualConv2d(code_dim * 4, code_dim * 16, 1, bias=False)
        self.act2 = FusedLeakyReLU(code_dim * 16)
        self.conv3 = EqualConv2d(code_dim * 16, channels, 1, bias=False)

    def forward(self, batch_like):
        h = self.input(batch_like)  # [B, 8, 4, 4]
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(h)))))  # [B, C, 4, 4]

    def install(self, generator):
        """G(M(z)) with this network's output in place of G's constant input (a forward hook: G's code is untouched)."""
        return generator.input.register_forward_hook(lambda module, inputs, output: self(inputs[0]))


# ------------------------------------------------------------------------------------------------
# METHOD (bsa): per-channel scale and shift of the generator's features, reconstruction losses


def styled_convs(generator):
    """The generator's StyledConv layers in forward order (conv1, then convs): the ones BSA adapts."""
    return [generator.conv1, *generator.convs]


class ScaleShift(nn.Module):
    """BSA's adapted statistics: gamma_l, beta_l [C_l] per StyledConv (init 1 and 0), applied by forward hooks as
    h -> gamma h + beta to the output of each layer's modulated, demodulated convolution (before noise, bias and
    leaky ReLU). `install(g)` hooks them into a Generator; the Generator's parameters are not touched."""

    def __init__(self, generator):
        super().__init__()
        channels = [layer.conv.out_channel for layer in styled_convs(generator)]
        self.gamma = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in channels])
        self.beta = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in channels])

    def install(self, generator):
        return [layer.conv.register_forward_hook(functools.partial(self._hook, k)) for k, layer in enumerate(styled_convs(generator))]

    def _hook(self, k, module, inputs, output):
        # gamma * h + beta, per channel
        return output * self.gamma[k].view(1, -1, 1, 1) + self.beta[k].view(1, -1, 1, 1)

    def regulariser(self):
        """sum_l mean((gamma_l - 1)^2) + mean(beta_l^2) (the official SNGAN bs_reg)."""
        # sum_l mean((gamma_l - 1)^2) + mean(beta_l^2)
        return sum(F.mse_loss(g, torch.ones_like(g)) + F.mse_loss(b, torch.zeros_like(b)) for g, b in zip(self.gamma, self.beta))


def latent_emd(z, t):
    """BSA's "EMD" of latents z [N, D] to N(0, I), estimated with Gaussian samples t [M, D] ~ N(0, I) (BSA: M = 10 N,
    BSA_EMD_SAMPLES per latent) and squared distances d_ij: mean_j min_i d_ij + mean_i min_j d_ij (nearest Gaussian
    sample of each z and nearest z of each sample)."""
    # d_ij = |z_i|^2 - 2 <z_i, t_j> + |t_j|^2
    dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ t.t() + t.pow(2).sum(1)  # [N, M]
    # mean_j min_i d_ij + mean_i min_j d_ij
    return dist.min(0).values.mean() + dist.min(1).values.mean()


def bsa_reconstruction_loss(fake, real, lpips_fn, weight_per):
    """(L1, LPIPS): mean |fake - real| and mean LPIPS-VGG(fake, real); images in [-1, 1]."""
    # (mean |G(z_n) - x_n|, mean LPIPS(G(z_n), x_n))
    return (fake - real).abs().mean(), lpips_fn(fake, real).mean() if weight_per > 0 else fake.new_zeros(())


def bsa_lr_scale(i):
    """The factor on BSA's learning rates at iteration i (0-based): lr_scale^floor((i + 1) / interval), as the official
    updater scales Adam's alpha before the update of every interval-th iteration."""
    return BSA_LR_DECAY ** ((i + 1) // BSA_LR_DECAY_EVERY)


class IndexBatches(common.BatchSampler):
    """BatchSampler's epochs of image indices (no flips: BSA reconstructs each image from its own latent)."""

    def __next__(self):
        if self.position >= len(self.chunks):
            self._new_epoch()
        index = self.chunks[self.position]
        self.position += 1
        return index


# ------------------------------------------------------------------------------------------------
# Loading an adapted checkpoint


def adapted_generator(path, device="cpu"):
    """The g_ema of a baselines.py checkpoint as the baseline samples it, in eval mode: a MineGAN checkpoint's
    g_ema with its miner in front of the mapping (and its input miner in place of the constant input), a BSA
    checkpoint's g_ema with its scale / shift hooks, any other checkpoint's plain g_ema. Returns a
    stylegan2.Generator (the miners as a forward pre-hook on g.style and a forward hook on g.input)."""
    models, raw = load_checkpoint(path, require=("g_ema",), device=device)
    g = models["g_ema"]
    if raw.get("scale_shift") is not None:
        scale_shift = ScaleShift(g).to(device)
        scale_shift.load_state_dict(raw["scale_shift"])
        scale_shift.requires_grad_(False).install(g)  # the hooks hold the only reference
    if raw.get("miner") is not None:
        miner = Miner(g.style_dim, raw["miner"]["transform.0.weight"].shape[0]).to(device)
        miner.load_state_dict(raw["miner"])
        miner.eval().requires_grad_(False)
        g.style.register_forward_pre_hook(lambda module, inputs: (miner([inputs[0]])[0],))
    if raw.get("input_miner") is not None:
        input_miner = InputMiner(g.input.input.shape[1]).to(device)
        input_miner.load_state_dict(raw["input_miner"])
        input_miner.eval().requires_grad_(False).install(g)
    return g.eval()


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    if args.baseline == "bsa":
        return train_bsa(args)
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)

    # SHARED: source checkpoint, target images, run folder
    models, source_ckpt = load_checkpoint(args.source, require=("g", "g_ema", "d"), device=device)
    g_source, g_ema, discriminator = models["g"], models["g_ema"], models["d"]  # G_s = the source's non-EMA g
    generator = copy.deepcopy(g_source).train()  # G_t, initialised from G_s
    g_source_ema = copy.deepcopy(g_ema)  # only for the source half of the sample grids
    common.requires_grad(g_source, False)
    common.requires_grad(g_ema, False)
    dataset = common.ImageFolder(args.target, generator.size)
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C
    latent_dim = generator.style_dim

    # METHOD: what each baseline adds (ADA's pipeline, FreezeD's frozen blocks, EWC's Fisher, MineGAN's miner)
    ada_set = ada_transforms(args.ada_pipe, args.ada_exclude)[0]
    ada_p, ada_signs = args.ada_p, [0.0, 0]  # p; (sum of sign D(x_real), count) since the last update
    frozen = set()
    if args.baseline == "freezed":
        frozen = freezed_parameter_names(discriminator, default_freeze_d(generator.size) if args.freeze_d is None else args.freeze_d)
    source_params, fisher = None, None
    if args.baseline == "ewc":
        print(f"estimating the source generator's Fisher information ({args.ewc_fisher_batches} batches of {args.batch})")
        fisher = estimate_fisher(g_source, discriminator, args.ewc_fisher_batches, args.batch, args.seed, device,
                                 per_sample=args.ewc_fisher == "per-sample")
        fisher = [fisher[name] for name, _ in generator.named_parameters()]
        source_params = [p.detach().clone() for p in g_source.parameters()]
    miner, input_miner, miners = None, None, []
    if args.baseline == "minegan":
        miner = Miner(latent_dim, args.miner_hidden).to(device)
        miners = [miner]
        if not args.no_input_miner:
            input_miner = InputMiner(generator.input.input.shape[1]).to(device)
            for g in (generator, g_ema):  # G(M(z)) and its EMA sample through the same (not averaged) miners, as official
                input_miner.install(g)
            miners.append(input_miner)

    # SHARED: --precision bf16 autocasts G and D
    runtime.autocast_forwards(args.precision, g_source, generator, discriminator)

    g_optim = common.make_adam(generator.parameters(), args.lr, args.g_reg_every)
    d_optim = common.make_adam(discriminator.parameters(), args.lr, args.d_reg_every)
    # the miners' Adam: official, groups of g_optim with its settings
    m_optim = common.make_adam([p for m in miners for p in m.parameters()], args.lr, args.g_reg_every) if miner else None
    # MineGAN's official train.py leaves the source run's moments out (its load_state_dict lines are commented out)
    if not args.ignore_source_optim and not miner and "g_optim" in source_ckpt and "d_optim" in source_ckpt:
        runtime.load_optimizer_moments(g_optim, source_ckpt["g_optim"])
        runtime.load_optimizer_moments(d_optim, source_ckpt["d_optim"])

    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
    sampler = dataset.sampler(args.batch, device)
    mean_path_length = torch.zeros((), device=device)
    # SHARED: under torchrun D's minibatch stddev over the global batch (after EWC's Fisher, which runs whole batches in
    # every process), gradients averaged in each optimiser's step(), the sampler's batches cut to this process's rows;
    # nothing in one process
    runtime.distribute(discriminator, [g_optim, d_optim, m_optim], sampler)

    state = run.resume_state()
    if state is not None:
        run.start = runtime.restore_training_state(state, generator, g_ema, discriminator, g_optim, d_optim)
        sample_z = state["sample_z"].to(device)
        mean_path_length = state["mean_path_length"].to(device)
        sampler.load_state_dict(state["sampler"])
        ada_p, ada_signs = float(state["ada_p"]), [float(state["ada_signs"][0]), int(state["ada_signs"][1])]
        if miner:
            miner.load_state_dict(state["miner"])
            m_optim.load_state_dict(state["miner_optim"])
            if input_miner:
                input_miner.load_state_dict(state["input_miner"])
            for p, grad in zip(m_optim.param_groups[0]["params"], state["miner_grads"]):  # the running sums
                p.grad = None if grad is None else grad.to(device)

    # SHARED: the source half of the sample grids (the source's g_ema), one fixed noise for both halves
    fixed_noise = [getattr(g_source_ema.noises, f"noise_{k}") for k in range(g_source_ema.num_layers)]
    with torch.no_grad():
        source_samples = g_source_ema([sample_z], noise=fixed_noise)[0].cpu()
    del g_source_ema

    def checkpoint(i_next):
        extra = {}
        if miner:
            extra = dict(miner=miner.state_dict(), miner_optim=m_optim.state_dict(),
                         miner_grads=[p.grad for p in m_optim.param_groups[0]["params"]])  # the official code's running sums
            if input_miner:
                extra["input_miner"] = input_miner.state_dict()
        return runtime.training_state(
            i_next, args, generator, g_ema, discriminator, g_optim, d_optim,
            sample_z=sample_z, mean_path_length=mean_path_length, sampler=sampler.state_dict(),
            ada_p=ada_p, ada_signs=list(ada_signs), **extra,
        )

    def write_samples(i):
        with torch.no_grad():
            adapted = g_ema(mine([sample_z]), noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)

    def mine(zs):
        return miner(zs) if miner else zs  # MineGAN: G(M(z)); the others: G(z)

    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # METHOD: MineGAN trains the miners alone for the first miner_iters iterations (official: G joins when i > 1000)
        train_g = not miner or i >= args.miner_iters

        def sample_latents(batch):
            return mine(common.mixing_noise(batch, latent_dim, args.mixing, device))

        def d_logits(images):
            if args.baseline == "ada":
                # every image D sees goes through A_p, drawn for the global batch (gathered under torchrun, then this
                # process's rows), so its random stream is the single-process run's
                images = ada_augment(runtime.gather(images, args.batch), ada_p, ada_set)[runtime.rows(args.batch)]
            return discriminator(images)  # [B, 1]

        # SHARED: D step
        real_img = next(sampler)  # [B, 3, H, W] (torchrun: this process's B/N rows)
        common.requires_grad(generator, False)
        for m in miners:
            common.requires_grad(m, False)
        set_d_trainable(discriminator, True, frozen)  # FreezeD: the frozen blocks never get gradients
        with torch.no_grad():
            fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        real_pred = d_logits(real_img)
        d_loss = common.d_logistic_loss(real_pred, d_logits(fake_img))
        discriminator.zero_grad()
        d_loss.backward()
        d_optim.step()

        # METHOD: ADA's r_t counts the sign of D on every real it sees: the main step's ...
        adaptive = args.baseline == "ada" and not args.ada_fixed
        if adaptive:
            ada_signs = count_signs(ada_signs, runtime.gather(real_pred.detach(), args.batch))  # the global batch's

        # SHARED: lazy R1 on the reals as seen by this iteration's D
        r1_loss = torch.zeros((), device=device)
        if i % args.d_reg_every == 0:
            real_img.requires_grad_(True)
            real_pred = d_logits(real_img).flatten(1).mean(1)  # [B]
            r1_loss = common.d_r1_loss(real_pred, real_img)
            discriminator.zero_grad()
            # gamma / 2 * R1 * k (lazy regularisation)
            (args.r1 / 2 * r1_loss * args.d_reg_every).backward()
            d_optim.step()
            if adaptive and not args.ada_rt_main_only:
                # ... and the R1 step's (ADA's loss.py reports Loss/signs/real in both phases)
                ada_signs = count_signs(ada_signs, runtime.gather(real_pred.detach(), args.batch))

        # METHOD: ADA's p update from r_t, every ada_interval D steps
        if adaptive and (i + 1) % args.ada_interval == 0:
            ada_p = ada_update_p(ada_p, ada_signs[0] / ada_signs[1], args.ada_target, args.batch, args.ada_interval, args.ada_kimg)
            ada_signs = [0.0, 0]

        # SHARED: G step
        common.requires_grad(generator, train_g)
        for m in miners:
            common.requires_grad(m, True)
        common.requires_grad(discriminator, False)
        generator.zero_grad()
        if miner and args.miner_zero_grad:  # official: the miners' gradients are never cleared (see --miner-zero-grad)
            m_optim.zero_grad()
        g_terms = common.BackwardEachTerm()  # each term's backward runs as soon as it is formed (less memory)
        fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        g_loss = common.g_nonsaturating_loss(d_logits(fake_img))
        g_terms.backward(g_loss)

        # METHOD: EWC's penalty lambda sum_i F_i (theta_i - theta_s,i)^2
        ewc_loss = torch.zeros((), device=device)
        if fisher is not None:
            ewc_loss = ewc_penalty(list(generator.parameters()), source_params, fisher)
            # L_G + lambda L_ewc
            g_terms.backward(args.ewc_weight * ewc_loss)
        g_terms.finish()
        if train_g:
            g_optim.step()
        if miner:
            m_optim.step()

        # SHARED: lazy path-length regularisation (z ~ p_z with mixing; MineGAN: through the miner, as its code)
        path_loss = torch.zeros((), device=device)
        if i % args.g_reg_every == 0:
            path_batch = max(1, args.batch // args.path_batch_shrink)
            fake_img, latents = runtime.generate_rows(generator, sample_latents(path_batch), return_latents=True)
            path_loss, mean_path_length, _ = common.g_path_regularize(fake_img, latents, mean_path_length, batch=path_batch)
            generator.zero_grad()
            if miner and args.miner_zero_grad:
                m_optim.zero_grad()
            (args.path_regularize * args.g_reg_every * path_loss).backward()
            if train_g:
                g_optim.step()
            if miner:
                m_optim.step()

        # SHARED: EMA, the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        common.accumulate(g_ema, generator, common.EMA_DECAY)
        losses = {"d": d_loss.item(), "g": g_loss.item(), "r1": r1_loss.item(), "path": path_loss.item(),
                  "mean_path": mean_path_length.item()}
        if args.baseline == "ada":
            losses["ada_p"] = ada_p
        if args.baseline == "ewc":
            losses["ewc"] = ewc_loss.item()
        run.end_iteration(i, losses)
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


def train_bsa(args):
    """BSA: reconstruction training of the scale / shift of G's features and one latent per image; no D."""
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)

    # SHARED: source checkpoint, target images, run folder
    models, _ = load_checkpoint(args.source, require=("g", "g_ema", "d"), device=device)
    g_source, discriminator = models["g_ema"], models["d"]  # BSA adapts the source's sampling network, g_ema
    generator = copy.deepcopy(g_source).eval()  # frozen weights; only the hooks' gamma / beta change its output
    common.requires_grad(generator, False)
    common.requires_grad(discriminator, False)
    dataset = common.ImageFolder(args.target, generator.size)
    args.batch = min(args.batch, len(dataset))  # official: min(N, configured batch), each image once per batch
    if args.batch % runtime.world_size():
        raise UserError(f"BSA's batch is min(--batch, {len(dataset)} images) = {args.batch}: run it on a number of processes that divides it")
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C
    latent_dim = generator.style_dim

    # METHOD: scale / shift per StyledConv channel (hooks), one z per training image (our choice: z_n ~ N(0, I))
    scale_shift = ScaleShift(generator).to(device)
    scale_shift.install(generator)
    latents = nn.Parameter(torch.randn(len(dataset), latent_dim, device=device))  # [N, D]
    bsa_optim = torch.optim.Adam([{"params": scale_shift.parameters(), "lr": args.lr},
                                  {"params": [latents], "lr": args.bsa_latent_lr}])  # Chainer's Adam defaults (0.9, 0.999, 1e-8)
    base_lrs = [group["lr"] for group in bsa_optim.param_groups]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        lpips_fn = common.load_lpips(args.lpips_net, device, random_backbone=args.lpips_random_backbone) if args.bsa_perceptual > 0 else None
    # the unchanged source G and D are stored with the result, so it stays a full rosinality checkpoint
    g_optim = common.make_adam(generator.parameters(), args.lr, 0)
    d_optim = common.make_adam(discriminator.parameters(), args.lr, 0)

    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
    sampler = IndexBatches(dataset, args.batch, device)
    targets = dataset.as_float().to(device)  # [N, 3, H, W]
    # SHARED: under torchrun the gradients averaged in the optimiser's step(); nothing in one process
    runtime.distribute(None, [bsa_optim])

    state = run.resume_state()
    if state is not None:
        run.start = int(state["iter"])
        scale_shift.load_state_dict(state["scale_shift"])
        with torch.no_grad():
            latents.copy_(state["bsa_latents"].to(device))
        bsa_optim.load_state_dict(state["bsa_optim"])
        sample_z = state["sample_z"].to(device)
        sampler.load_state_dict(state["sampler"])
        runtime.set_rng_state(state["rng"])

    # SHARED: the source half of the sample grids, one fixed noise for both halves
    fixed_noise = [getattr(g_source.noises, f"noise_{k}") for k in range(g_source.num_layers)]
    with torch.no_grad():
        source_samples = g_source([sample_z], noise=fixed_noise)[0].cpu()

    def checkpoint(i_next):
        return runtime.training_state(
            i_next, args, g_source, g_source, discriminator, g_optim, d_optim,
            scale_shift=scale_shift.state_dict(), bsa_latents=latents.detach().clone(), bsa_optim=bsa_optim.state_dict(),
            sample_z=sample_z, sampler=sampler.state_dict(),
        )

    def write_samples(i):
        with torch.no_grad():
            adapted = generator([sample_z], noise=fixed_noise)[0]
            recon = generator([latents], noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)
        runtime.save_comparison_grid(os.path.join(run.samples, f"recon_{i:06d}.png"), targets.cpu(), recon.cpu())

    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # METHOD: BSA's step schedule, lr x0.2 every 3000 iterations (official exponential_shift, lr_scale 0.2)
        for group, base in zip(bsa_optim.param_groups, base_lrs):
            group["lr"] = base * bsa_lr_scale(i)
        index = next(sampler).to(device)  # [B] image indices
        z = latents[index] + BSA_Z_EPS * torch.randn(len(index), latent_dim, device=device)  # z_n + eps
        part = runtime.rows(args.batch)  # this process's rows (all of them in a single process)
        fake = runtime.generate_rows(generator, [z], noise=fixed_noise)[0]  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        pixel_loss, perceptual_loss = bsa_reconstruction_loss(fake, targets[index[part]], lpips_fn, args.bsa_perceptual)
        gaussian = torch.randn(BSA_EMD_SAMPLES * len(index), latent_dim, device=device)  # [M, D] ~ N(0, I)
        emd_loss = latent_emd(latents[index], gaussian)
        reg_loss = scale_shift.regulariser()
        # L1 + lambda_per LPIPS + lambda_emd EMD + lambda_re sum_l |gamma_l - 1|^2 + |beta_l|^2
        loss = pixel_loss + args.bsa_perceptual * perceptual_loss + args.bsa_emd * emd_loss + args.bsa_reg * reg_loss
        bsa_optim.zero_grad()
        loss.backward()
        bsa_optim.step()

        # SHARED: the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        run.end_iteration(i, {"loss": loss.item(), "pixel": pixel_loss.item(), "perceptual": perceptual_loss.item(),
                              "emd": emd_loss.item(), "reg": reg_loss.item()})
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
