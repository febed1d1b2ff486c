"""RSSA: Few Shot Generative Model Adaption via Relaxed Spatial Structural Alignment (Xiao et al., CVPR 2022).

Adapts a source StyleGAN2 G_s to ~10 target images on top of CDC's adversarial part (anchors, image-level /
patch-level D). The adapted G_t keeps the *spatial* structure of G_s's features: inside local windows the
self-correlation of G_t(w) equals that of G_s(w) (L_scc), and the cross-sample correlations between a few
nearby samples match across domains (L_dcc). The latent space is "relaxed" towards the target: every w is
pulled, per W+ slot, onto the span of the target images' inverted codes (P), in training and at inference.

Objective (paper unavailable: reconstructed from the official code and the repository's overview figure):
    Inversion, once per target set (fixed noise, W+ started at w_avg):
        w_i = argmin_w  LPIPS_vgg(G_s(w), x_i) + MSE(G_s(w), x_i)
    Compression of any code w (per W+ slot l, A_l = [w_1,l ... w_N,l] in R^{D x N}):
        Pi_l w_l = A_l (A_l^T A_l)^{-1} A_l^T w_l,     p_l = Pi_l w_l * |w_l| / |Pi_l w_l|
        P(w)_l   = s_l p_l + (1 - s_l) w_l             (s_l: per-slot blend, face / church tables)
    Self-correlation consistency, on the styled-conv maps F at 64^2..256^2 (both G fed P(w), fixed noise):
        X = avgpool_2x2( F / |F|_channel ),  windows Omega = the 2x2 grid of H/4 x H/4 windows + the centre one
        L_scc = sum_l [ mean_{b, Omega in grid} smoothL1( X_t X_t^T - X_s X_s^T ) + mean_{b} smoothL1( same, centre ) ]
    Disturbance correlation consistency, on the maps 4^2..first 128^2 of N = 4 samples (z as coded: iid):
        R_jk,p(a, c) = < F_j(a) / |F_j(a)|, F_k(c) / |F_k(c)| >    (positions a, c of window p; whole map up to 32^2,
                                                                    a 4x4 grid of windows at 64^2 and 128^2)
        L_dcc = sum_l mean_{j<k} mean_{p, a} | softmax_c R^s_jk,p(a, c) - softmax_c R^t_jk,p(a, c) |_1
    L_G = L_adv + 0.8 L_scc + 1[i mod 6 = 0] 0.4 L_dcc        (+ lazy path length every 4th iteration)
    L_adv: CDC's (anchor iterations: image-level D; otherwise z ~ p_z and the 32x32 patch head).
    The codes that span P: one per target image (rule below; --span picks a subset).

Differs from cdc.py:
  - P on every generator latent (D step, G step, anchors, structure losses, path length, sample grids). The
    target codes come from an inversion run once and cached in the run folder.
  - No style mixing in effect: the second z is still drawn with probability 0.9 (same RNG draws as CDC's
    mixing_noise), but the official generator takes W+ input and keeps the first code of a pair.
  - CDC's L_dist is gone; L_scc (every iteration) and L_dcc (every 6th) take its place, with the generators'
    fixed noise buffers on both sides.
  - G_t, G_s and g_ema all start from the source's g_ema (CDC: g); the checkpoint needs only g_ema and d.
  - Path length runs on the structure losses' latents (batch 4, through P), not on mixing noise.
  - 2001 iterations by default (per-domain presets), the source half of the grids is G_s(z) without P
    (as the official generate.py), and the checkpoint carries the codes and blend that define P.

Where the official code (StevenShaw1999/RSSA, train_face_proj.py / train_church_proj.py) differs from the
paper's figure, this file follows the code: L_dcc feeds four independent z instead of disturbed copies
z + r_i of one anchor, and skips P; P works in W+ (after the mapping), not in Z, and stays on at inference;
L_scc has no softmax and uses fixed windows on pooled features; the weights 0.8 / 0.4 and the period 6 are
the code's (the figure suggests L_scc + L_dcc); the blend tables were retuned after the released models.
Official-code bugs behind flags (default: the official behaviour):
  --mixing-fix              cross the two W+ codes over at k ~ U{1..n_latent-1} (an extra Python random
                            draw), the style mixing the code intends: its Generator.forward sets inject_index
                            = n_latent whenever input_is_latent=True, so every D / G step trains unmixed,
  --dcc-latents disturbed   use the disturbed codes 0.85 z_a + 0.15 n_i the code builds and never uses,
  --dcc-compress            pass them through P as the figure does,
  --no-compress             turn P off (the official --proj is a store_true with a truthy default),
  --feat-const-batch N      any N >= 2 (the official reshapes hard-code 4 samples and 512 channels),
  --path-latents fresh      path length on mixing noise of batch/2 through P (the code ignores that draw
                            and reuses the 4 structure-loss codes, the disturbed ones every 12th iteration),
  --invert-resize training  invert the training images (LANCZOS + centre crop), not a nearest-neighbour
                            stretch of the raw files.
Which codes span P (official choose_idx, model.py): the 10-shot runs use range(10), all target images; the
face -> VanGogh run uses range(9), i.e. all 9 images of its 9-image set (9_latentcode.npy belongs to no image
of it); the 5-shot runs pick, from the 10-image set's inversion, fixed indices that are exactly their 5
training images. So the rule here is: every target image's code (the default --span all); picking codes out
of a larger inversion equals inverting those images alone (independent per-image problems, one shared w_avg
start). The exception is run.sh's caricatures 5-shot line, which trains on the 10-image set with P spanned by
5 of them: preset face2caricatures-5shot (--span 90,94,96,97,98, 5 anchors).
The inversion runs 4001 Adam updates: invert_gan.py saves the code at step 4000 after that step's update.
Not reproduced: codes indexed by os.listdir order (here keyed by file name), unseeded NumPy, non-strict
loads, only g_ema saved, `Tensor.resize`, and the 4096 x 4096 Gram matrices held in memory in training (the plain
form is self_correlation_loss_plain; training uses self_correlation_loss, in row blocks with the gradient fused in;
same values).
"""

import argparse
import collections
import copy
import os
import random

import torch
import torch.nn.functional as F

import common
import runtime
from common import UserError
from checkpoints import load_checkpoint, read_checkpoint

# P's per-slot blend s_l by octave below the output resolution (output, /2, /4, /8, /16; coarser: 0); at
# 256 px the official tables (face: Projection_module, church: Projection_module_church, HEAD 47f5701)
BLEND_TABLES = {"face": (0.85, 0.65, 0.45, 0.05, 0.05), "church": (0.75, 0.55, 0.35, 0.05, 0.05)}
# --preset: blend table, iterations, the target images whose codes span P ("all" or file names) and the number
# of anchors (None: one per target image). Official run.sh: --iter 2002 (1502 caricatures, 1302 haunted
# 5-shot) and final.pt written at i = iter - 2, i.e. after iter - 1 iterations. Its caricatures 5-shot line
# trains on the 10-image set with --n_train 5 and --task 5, whose choose_idx [1, 3, 4, 6, 8] are the codes of
# 98, 97, 94, 90, 96 (the listdir order of the shipped latents)
Preset = collections.namedtuple("Preset", "blend iters span n_train", defaults=("all", None))
PRESETS = {
    "face": Preset("face", 2001),
    "church": Preset("church", 2001),
    "face2caricatures": Preset("face", 1501),
    "face2caricatures-5shot": Preset("face", 1501, "90,94,96,97,98", 5),
    "face2sketches": Preset("face", 2001),
    "face2vangogh": Preset("face", 2001),
    "church2vangogh": Preset("church", 2001),
    "church2haunted": Preset("church", 2001),
    "church2haunted-5shot": Preset("church", 1301),
}
GRAM_CHUNK_ELEMENTS = 2**24  # correlation entries per row block of L_scc (two such fp32 blocks: 128 MiB)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="RSSA few-shot adaptation (Xiao et al., CVPR 2022)")
    runtime.add_common_args(parser, iter=2001)
    # METHOD: relaxed spatial structural alignment
    parser.add_argument("--preset", choices=sorted(PRESETS), default="face",
                        help="source family (blend table), iterations, span of P and anchors of an official run.sh line; --iter, "
                             "--blend, --span and --n-train override it. "
                             + "; ".join(f"{k}: {p.blend} blend, {p.iters} iterations"
                                         + ("" if p.span == "all" else f", P spanned by {p.span}, {p.n_train} anchors")
                                         for k, p in PRESETS.items()))
    parser.add_argument("--scc-wt", type=float, default=0.8, help="lambda_scc, weight of L_scc (default 0.8: official code; the paper's value is not known here)")
    parser.add_argument("--dcc-wt", type=float, default=0.4, help="lambda_dcc, weight of L_dcc (default 0.4: official code; the paper's value is not known here)")
    parser.add_argument("--dcc-every", type=int, default=6, help="L_dcc every k iterations (default 6: official dis_corr_freq; with --no-scc every iteration, as the official code)")
    parser.add_argument("--feat-const-batch", type=int, default=4,
                        help="N, samples for L_scc, L_dcc and the official path-length batch (default 4: official code, whose L_dcc reshapes hard-code 4; other values are the fix)")
    parser.add_argument("--dcc-latents", choices=["as_coded", "disturbed"], default="as_coded",
                        help="as_coded: N iid z, the official code (default); disturbed: 0.85 z_a + 0.15 n_i around one z_a, "
                             "the codes the official code builds but never uses (fix)")
    parser.add_argument("--dcc-compress", action="store_true", help="pass the L_dcc codes through P as the paper's figure (official: no P; fix)")
    parser.add_argument("--path-latents", choices=["as_coded", "fresh"], default="as_coded",
                        help="as_coded: path length on the structure losses' N codes, the official code (default); "
                             "fresh: mixing noise of batch / path-batch-shrink through P, as CDC (fix; crossed over only with --mixing-fix)")
    parser.add_argument("--no-scc", action="store_true", help="ablation: drop L_scc")
    parser.add_argument("--no-dcc", action="store_true", help="ablation: drop L_dcc")
    # METHOD: relaxed latent alignment (inversion + compression P)
    parser.add_argument("--blend", default=None,
                        help="s_l, P's per-slot blend: face or church (the official code's tables, anchored at the output resolution for "
                             "sizes other than 256: our choice) or n_latent comma-separated values (default: the preset's table)")
    parser.add_argument("--no-compress", action="store_true",
                        help="turn P off: no inversion, plain latents (official: always on, its --proj cannot be unset; fix)")
    parser.add_argument("--span", default=None,
                        help="the target images whose codes span P: all, or comma-separated file names (extension optional) "
                             "(default: the preset's, all except for face2caricatures-5shot: the official choose_idx, see the module docstring)")
    parser.add_argument("--invert-steps", type=int, default=4001,
                        help="inversion Adam updates (default 4001: official invert_gan.py saves its last code at step 4000 of "
                             "4002, after that step's update)")
    parser.add_argument("--invert-batch", type=int, default=0,
                        help="targets inverted together (default 0: all at once, our choice; the official code inverts one "
                             "image per run. The problems are independent, so a smaller "
                             "batch gives the same codes up to float rounding with less memory: at 256 px the inversion of 10 "
                             "targets at once is this method's memory peak)")
    parser.add_argument("--invert-lr", type=float, default=0.1, help="inversion Adam lr, halved every 1000 steps (default 0.1: official code)")
    parser.add_argument("--invert-resize", choices=["nearest", "training"], default="nearest",
                        help="nearest: the raw file stretched to the generator size, official code (default); "
                             "training: the training images (LANCZOS, centre crop) (fix)")
    parser.add_argument("--reinvert", action="store_true", help="recompute the cached target codes (<out>/target_codes.pt)")
    parser.add_argument("--lpips-net", choices=["vgg", "toy"], default="vgg",
                        help="the inversion's perceptual distance: vgg, LPIPS-VGG (default: official code; needs torchvision's VGG16 "
                             "weights) or toy, the demo's toy network (demo/toynet.py, LPIPS-style; the demo's default)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="tests only: LPIPS with a randomly initialised VGG instead of the pretrained one")
    # METHOD: relaxed realism (anchors + patch discriminator), as CDC
    parser.add_argument("--subspace-freq", type=int, default=4, help="anchor iteration every k iterations (default 4: official code)")
    parser.add_argument("--subspace-std", type=float, default=0.1, help="sigma of the anchor regions (default 0.1: official code)")
    parser.add_argument("--n-train", type=int, default=None,
                        help="number of anchors (default: the preset's, else the number of target images, as CDC's paper; official --n_train 10)")
    parser.add_argument("--highp", type=int, default=1, help="patch map drawn from the first k of CDC's 4 maps (default 1: the 32x32 map, official code)")
    # SHARED: StyleGAN2 regularisers, as rosinality / the official code
    parser.add_argument("--r1", type=float, default=10, help="R1 weight gamma (default 10: official code)")
    parser.add_argument("--path-regularize", type=float, default=2, help="path-length weight (default 2: official code)")
    parser.add_argument("--path-batch-shrink", type=int, default=2, help="path-length batch divisor with --path-latents fresh (default 2: official code)")
    parser.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (default 16: official code)")
    parser.add_argument("--g-reg-every", type=int, default=4, help="lazy path-length interval (default 4: official code)")
    parser.add_argument("--mixing", type=float, default=0.9,
                        help="probability of drawing a second z on non-anchor iterations (default 0.9: official code; without "
                             "--mixing-fix the second code is drawn and dropped, as the official code does)")
    parser.add_argument("--mixing-fix", action="store_true",
                        help="cross the two W+ codes over at a random slot k ~ U{1..n_latent-1} (fix). Official code (default): "
                             "Generator.forward sets inject_index = n_latent for input_is_latent=True, so a pair of W+ codes "
                             "yields the first one only: no style mixing in effect")
    parser.add_argument("--ignore-source-optim", action="store_true",
                        help="start Adam from zero moments instead of the source run's g_optim/d_optim (official CDC code: loaded when present)")
    parser.set_defaults(iter=None)  # None: the preset's
    args = runtime.parse_args_or_demo(parser, argv, "rssa", **runtime.DEMO_SCHEDULE, invert_steps=500, lpips_net="toy")
    preset = PRESETS[args.preset]
    args.iter = preset.iters if args.iter is None else args.iter
    args.blend = args.blend or preset.blend
    args.span = args.span or preset.span
    args.n_train = args.n_train or preset.n_train
    runtime.check_common_args(args)
    runtime.check_discriminator_batch(args.batch)
    if args.feat_const_batch < 2 or args.dcc_every < 1 or args.invert_steps < 1 or args.invert_lr <= 0 or args.invert_batch < 0:
        raise UserError("--feat-const-batch must be at least 2, --dcc-every and --invert-steps at least 1, --invert-lr positive, "
                        "--invert-batch at least 0")
    if args.subspace_freq < 1 or not 1 <= args.highp <= 4:
        raise UserError("--subspace-freq must be >= 1 and --highp in 1..4")
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD: the structural alignment losses


def windows(x, grid):
    """[B, C, H, W] -> [B * grid^2, (H / grid) (W / grid), C]: the grid x grid non-overlapping windows, positions row-major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, grid, h // grid, grid, w // grid)  # [B, C, g, k, g, k]
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b * grid * grid, (h // grid) * (w // grid), c)  # [B g^2, k^2, C]


def self_correlation_loss_plain(feats_src, feats_tgt):
    """RSSA's L_scc without its weight, in the plain form of the official code (the reference; the training loop
    uses its memory-saving equal, self_correlation_loss, below). feats_*: lists of the same layers [B, C, H, H] of
    G_s and G_t for the same latents (H divisible by 8); the source side gets no gradient. Returns a scalar.
    Holds every [n, n] Gram matrix: at 256^2, 4096 x 4096 per window (about 2 GB per layer with its backward)."""
    total = 0
    for f_s, f_t in zip(feats_src, feats_tgt):
        b, c, h, _ = f_s.shape
        k = h // 4  # window side, on the pooled H/2 map
        # X = avgpool_2x2( F / |F|_channel ), source and target stacked: [2B, C, H/2, H/2]
        x = F.adaptive_avg_pool2d(F.normalize(torch.cat([f_s.detach(), f_t]), dim=1), h // 2)
        # the 2x2 grid of k x k windows, positions row-major: [2B 4, k^2, C]
        unfolded = F.unfold(x, k, stride=k).reshape(2 * b, c, k * k, 4).permute(0, 3, 2, 1).reshape(2 * b * 4, k * k, c)
        # term A: mean_{b, Omega in grid} smoothL1( X_t X_t^T - X_s X_s^T )   (SmoothL1Loss: beta 1, mean over all entries)
        gram = unfolded @ unfolded.transpose(1, 2)  # [2B 4, k^2, k^2]
        total = total + torch.nn.SmoothL1Loss()(gram[4 * b :], gram[: 4 * b])
        # term B: mean_{b} smoothL1( X_t X_t^T - X_s X_s^T ) on the centre window [k/2, k/2 + k)^2
        centre = x[:, :, k // 2 : h // 2 - k // 2, k // 2 : h // 2 - k // 2].flatten(2).transpose(1, 2)  # [2B, k^2, C]
        gram = centre @ centre.transpose(1, 2)  # [2B, k^2, k^2]
        total = total + torch.nn.SmoothL1Loss()(gram[b:], gram[:b])
    # L_scc = sum over layers of term A + term B
    return total


# ------------------------------------------------------------------------------------------------
# METHOD: L_scc's memory path (row blocks, gradient fused in), equal to self_correlation_loss_plain


class _GramSmoothL1(torch.autograd.Function):
    """mean_{w, a, b} smoothL1( (X_t X_t^T)[w, a, b] - (X_s X_s^T)[w, a, b] ) and its gradient w.r.t. X_t.

    Computed over blocks of rows a with the gradient formed in the same pass, so no [W, n, n] matrix is ever
    held (at 256^2 the official code keeps 32 of 4096 x 4096 per layer and the smooth-L1 input for backward).
    X_s gets no gradient (the source side is constant).
    """

    @staticmethod
    def forward(ctx, x_src, x_tgt, rows):
        n_win, n, _ = x_tgt.shape
        numel = n_win * n * n
        total = x_tgt.new_zeros(())
        grad = torch.empty_like(x_tgt) if ctx.needs_input_grad[1] else None
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            # d = X_t[a] X_t^T - X_s[a] X_s^T, for the rows a of this block
            diff = x_tgt[:, block] @ x_tgt.transpose(1, 2)  # [W, r, n]
            diff.baddbmm_(x_src[:, block], x_src.transpose(1, 2), alpha=-1)  # [W, r, n]
            clipped = diff.clamp(-1, 1)  # [W, r, n], c = smoothL1'(d)
            if grad is not None:
                # dL/dX_t = (C + C^T) X_t / numel = 2 C X_t / numel (C symmetric: d is)
                grad[:, block] = clipped @ x_tgt * (2 / numel)  # [W, r, C]
            # smoothL1(d) = d^2 / 2 if |d| < 1 else |d| - 1/2, = c (d - c / 2), in place
            total += diff.sub_(clipped, alpha=0.5).mul_(clipped).sum()
        ctx.save_for_backward(grad)
        return total / numel

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return None, grad_output * grad, None


def gram_smooth_l1(x_src, x_tgt, chunk_elements=GRAM_CHUNK_ELEMENTS):
    """mean smooth-L1 (beta 1) between the Gram matrices X_t X_t^T and X_s X_s^T of [W, n, C] windows."""
    rows = max(1, chunk_elements // (x_tgt.shape[0] * x_tgt.shape[1]))
    return _GramSmoothL1.apply(x_src.detach().contiguous(), x_tgt.contiguous(), rows)


def self_correlation_loss(feats_src, feats_tgt, chunk_elements=GRAM_CHUNK_ELEMENTS):
    """RSSA's L_scc without its weight: equal to self_correlation_loss_plain (value and gradient, up to float
    rounding; tests/test_rssa.py checks both), and what the training loop uses. feats_*: lists of the same layers
    [B, C, H, H] of G_s and G_t for the same latents (H divisible by 8); the source side gets no gradient.
    Why it exists: the plain form holds every [n, n] Gram matrix and the smooth-L1 input for backward (at 256^2,
    4096 x 4096 per window, about 2 GB per layer); here the Gram products are formed chunk_elements entries at a
    time with the gradient fused in (_GramSmoothL1), so memory stays at two such blocks. Same windows as the plain
    form (avg_pool2d at an even H is its adaptive pool; windows() is its unfold order), summed over layers:
        mean smooth-L1 over the 2x2 grid of windows + mean smooth-L1 over the centre window."""
    total = feats_tgt[0].new_zeros(())
    for f_src, f_tgt in zip(feats_src, feats_tgt):
        pooled = []
        for f in (f_src.detach(), f_tgt):
            # X = avgpool_2x2(F / |F|): unit vectors per position, then 2x2 means (no longer unit length)
            pooled.append(F.avg_pool2d(F.normalize(f, dim=1), 2))  # [B, C, H/2, H/2]
        k = pooled[0].shape[-1] // 2  # window side H/4
        # term A: S = X X^T inside each window of the 2x2 grid
        total = total + gram_smooth_l1(windows(pooled[0], 2), windows(pooled[1], 2), chunk_elements)  # [B 4, k^2, C]
        # term B: the centre window [k/2, k/2 + k)^2, overlapping all four
        centre = [p[:, :, k // 2 : k // 2 + k, k // 2 : k // 2 + k] for p in pooled]  # [B, C, k, k]
        total = total + gram_smooth_l1(windows(centre[0], 1), windows(centre[1], 1), chunk_elements)  # [B, k^2, C]
    return total


def disturbance_correlation_loss(feats_src, feats_tgt, grids):
    """RSSA's L_dcc without its weight. feats_*: lists of the same layers [N, C, H, W] of G_s and G_t for the same
    N latents; grids[l]: 1 (whole map) or g (a g x g grid of windows) for layer l. Official value (N = 4):
        sum_l mean_{j<k} mean_{p, a} | softmax_c R^s_jk,p(a, c) - softmax_c R^t_jk,p(a, c) |_1
    (the official code's per-anchor L1Loss means times (3 - j) and n, divided by 6 = the number of pairs)."""
    total = feats_tgt[0].new_zeros(())
    for f_src, f_tgt, grid in zip(feats_src, feats_tgt, grids):
        n_samples = f_tgt.shape[0]
        first, second = torch.triu_indices(n_samples, n_samples, 1, device=f_tgt.device)  # all pairs j < k
        probs = []
        for f in (f_src.detach(), f_tgt):
            x = windows(F.normalize(f, dim=1), grid)  # [N g^2, n, C], unit vectors per position
            x = x.view(n_samples, grid * grid, x.shape[1], x.shape[2])  # [N, P, n, C]
            # R_jk,p(a, c) = <x_j(a), x_k(c)> (cosine), every pair j < k, window p
            r = x[first] @ x[second].transpose(2, 3)  # [pairs, P, n, n]
            # softmax over the positions c of sample k (temperature 1)
            probs.append(torch.softmax(r, dim=3))  # [pairs, P, n, n]
        # row-wise L1 distance, mean over pairs, windows and rows
        total = total + (probs[1] - probs[0]).abs().sum(3).mean()
    return total


def structure_layers(g):
    """Official layers at 256 px, relative to the output size elsewhere (our choice for other sizes).

    L_scc: the styled convs at >= size/4 (feats 7-12: 64^2..256^2). L_dcc: feats 0 .. num_layers - 4 (4^2 up to
    the first 128^2 conv), whole maps below size/4 (up to 32^2), a 4x4 grid of windows from size/4 on.
    Returns (scc indices, dcc indices, dcc grid per dcc index).
    """
    resolution = [2 ** ((k + 1) // 2 + 2) for k in range(g.num_layers)]  # feats k: 4, 8, 8, 16, 16, ...
    scc = [k for k in range(g.num_layers) if resolution[k] >= g.size // 4]
    dcc = list(range(g.num_layers - 3))
    return scc, dcc, [4 if resolution[k] >= g.size // 4 else 1 for k in dcc]


# ------------------------------------------------------------------------------------------------
# METHOD: relaxed latent alignment: compression P onto the span of the inverted target codes


def slot_blend(spec, n_latent, size):
    """s_l for every W+ slot [n_latent]: a named table (by octave below the output) or explicit values."""
    if spec in BLEND_TABLES:
        table = BLEND_TABLES[spec]
        log_size = size.bit_length() - 1
        # slot 0: the 4x4 conv; slots 2m-1, 2m: resolution 2^(m+2); the last slot: the final to_rgb
        log_res = [2] + [min((l + 1) // 2 + 2, log_size) for l in range(1, n_latent)]
        return torch.tensor([table[log_size - r] if log_size - r < len(table) else 0.0 for r in log_res])
    try:
        values = torch.tensor([float(v) for v in spec.split(",")])
    except ValueError:
        raise UserError(f"--blend {spec!r}: use face, church or {n_latent} comma-separated numbers") from None
    if values.numel() != n_latent or values.min() < 0 or values.max() > 1:
        raise UserError(f"--blend needs {n_latent} values in [0, 1] (one per W+ slot), got {values.numel()}")
    return values


def span_projectors(codes):
    """Orthogonal projectors onto span{w_1,l ... w_N,l} per W+ slot: codes [N, n_latent, D] -> [n_latent, D, D].

    Pi_l = A_l (A_l^T A_l)^{-1} A_l^T = U_l U_l^T (U_l: left singular vectors of A_l), in float64; the official
    torch.inverse in fp32 gives the same matrix for its full-rank codes, the SVD also for rank-deficient ones.
    """
    a = codes.double().permute(1, 2, 0)  # [L, D, N], A_l
    u, s, _ = torch.linalg.svd(a, full_matrices=False)  # [L, D, N], [L, N]
    keep = s > s[:, :1] * max(a.shape[1:]) * torch.finfo(torch.float64).eps  # numerical rank
    u = u * keep[:, None, :]  # [L, D, N]
    return (u @ u.transpose(1, 2)).float()  # [L, D, D]


def compress_latents(w, projectors, blend):
    """P(w): w [B, D] (every slot) or [B, n_latent, D], projectors [n_latent, D, D], blend [n_latent] -> [B, n_latent, D]."""
    if w.ndim == 2:
        w = w.unsqueeze(1).expand(-1, projectors.shape[0], -1)  # [B, L, D]
    # Pi_l w_l
    p = torch.einsum("lde,ble->bld", projectors, w)  # [B, L, D]
    # p_l = Pi_l w_l |w_l| / |Pi_l w_l|
    p = p * (w.norm(dim=2, keepdim=True) / p.norm(dim=2, keepdim=True).clamp_min(1e-12))  # [B, L, D]
    # P(w)_l = s_l p_l + (1 - s_l) w_l
    s = blend[None, :, None]  # [1, L, 1]
    return s * p + (1 - s) * w  # [B, L, D]


def latents_wplus(g, zs, projectors, blend, mixing=False):
    """One W+ code [B, n_latent, D] from a list of one or two z: w = g.style(z), then P(w) when projectors is not None.

    Two z, mixing False (official code): the first code only. The official Generator.forward sets inject_index =
    n_latent for input_is_latent=True, so cat(w0[:, :n_latent], w1[:, n_latent:]) = w0 and no Python random is
    drawn; the official code also maps and compresses the second z, which changes no value or RNG state, so it
    is skipped here. mixing True (fix): the crossover cat(w0[:, :k], w1[:, k:]) with k ~ U{1 .. n_latent - 1}."""
    ws = []
    for z in zs if mixing else zs[:1]:
        w = g.style(z)  # [B, D]
        ws.append(compress_latents(w, projectors, blend) if projectors is not None else w.unsqueeze(1).repeat(1, g.n_latent, 1))
    if len(ws) == 1:
        return ws[0]  # [B, L, D]
    k = random.randint(1, g.n_latent - 1)
    return torch.cat([ws[0][:, :k], ws[1][:, k:]], 1)  # [B, L, D]


class CompressedGenerator(torch.nn.Module):
    """An adapted RSSA generator as the official generate.py samples it, with P in front: z -> P(g.style(z)) ->
    g(input_is_latent=True). P is part of the adapted model (spec: used at inference), so evaluate.py and the
    demo testbed wrap an RSSA checkpoint's g_ema in this when the checkpoint holds target codes. Called like a
    Generator with z lists (two: the first code only, as the official Generator with W+ input); truncation acts
    on P(w)."""

    def __init__(self, g, codes, blend):
        super().__init__()
        self.g = g
        self.register_buffer("projectors", span_projectors(codes))  # [n_latent, D, D]
        self.register_buffer("blend", blend)  # [n_latent]
        self.size, self.style_dim, self.n_latent, self.num_layers = g.size, g.style_dim, g.n_latent, g.num_layers

    @property
    def noises(self):
        return self.g.noises

    def mean_latent(self, n):
        return self.g.mean_latent(n)

    def forward(self, styles, input_is_latent=False, **kwargs):
        if not input_is_latent:
            styles = [latents_wplus(self.g, styles, self.projectors, self.blend)]  # [B, n_latent, D]
        return self.g(styles, input_is_latent=True, **kwargs)


def stretched_image(path, size):
    """The official inversion input: the file's RGB pixels stretched to size x size (nearest), in [-1, 1]: [3, S, S]."""
    from PIL import Image

    with Image.open(path) as image:
        array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        pixels = array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1  # [3, h, w]
    return F.interpolate(pixels[None], size=(size, size), mode="nearest")[0]  # [3, S, S]


def span_indices(spec, names):
    """Positions in the target files `names` of the images whose codes span P: all of them for "all" (the official
    rule, see the module docstring), else the comma-separated file names, each with or without its extension."""
    if spec == "all":
        return list(range(len(names)))
    picked = []
    for item in spec.split(","):
        matches = [k for k, name in enumerate(names) if item in (name, os.path.splitext(name)[0])]
        if len(matches) != 1:
            raise UserError(f"--span {spec}: {item!r} names {len(matches)} of the target images {', '.join(names)} (need exactly 1)")
        picked.append(matches[0])
    if len(set(picked)) != len(picked):
        raise UserError(f"--span {spec}: an image is named twice")
    return picked


def target_codes(args, g, dataset, run, device):
    """The target images' W+ codes [N, n_latent, D], keyed by file name in <out>/target_codes.pt: reused when
    present (and made with the same settings), otherwise (or with --reinvert) inverted and written with a
    reconstruction grid. Runs on its own seeded RNG stream, so training draws the same either way. Under torchrun
    every process inverts (the same codes) and rank 0 writes the cache."""
    path = os.path.join(run.root, "target_codes.pt")
    names = [os.path.basename(f) for f in dataset.files]
    settings = {"steps": args.invert_steps, "lr": args.invert_lr, "resize": args.invert_resize,
                "lpips_random_backbone": args.lpips_random_backbone, "size": g.size, "style_dim": g.style_dim,
                "lpips_net": args.lpips_net}
    if os.path.exists(path) and not args.reinvert:
        cache = read_checkpoint(path)
        if cache["files"] != names or dict({"lpips_net": "vgg"}, **cache["settings"]) != settings:  # older caches: vgg
            raise UserError(f"{path} holds codes of other images or settings ({cache['settings']}); use --reinvert")
        print(f"using the cached target codes {path}")
        return cache["codes"].to(device)
    if args.invert_resize == "nearest":
        images = torch.stack([stretched_image(f, g.size) for f in dataset.files]).to(device)  # [N, 3, S, S]
    else:
        images = dataset.as_float().to(device)  # [N, 3, S, S]
    print(f"inverting {len(names)} target images into W+ ({args.invert_steps} steps)")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        lpips_fn = common.load_lpips(args.lpips_net, device, random_backbone=args.lpips_random_backbone)
        w_avg = common.mean_w(g)  # [D], drawn once for every chunk
        chunk = args.invert_batch or len(images)
        parts = [common.invert_wplus(g, images[k:k + chunk], lpips_fn, args.invert_steps, args.invert_lr, w_avg)  # the official inversion
                 for k in range(0, len(images), chunk)]
        codes, history = torch.cat([c for c, _ in parts]), torch.cat([h for _, h in parts], 1)  # [N, L, D], [steps, N]
    with torch.no_grad():
        recon, _ = g([codes], input_is_latent=True, randomize_noise=False)  # [N, 3, S, S]
    runtime.save_comparison_grid(os.path.join(run.root, "target_codes.png"), images.cpu(), recon.cpu())
    runtime.save_checkpoint(path, {"files": names, "codes": codes.cpu(), "settings": settings, "loss": history[-1].cpu()})
    return codes


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)

    # SHARED: source checkpoint, target images, run folder
    models, source_ckpt = load_checkpoint(args.source, require=("g_ema", "d"), device=device)
    g_source, discriminator = models["g_ema"], models["d"]  # G_s = the source's g_ema (official RSSA)
    generator = copy.deepcopy(g_source).train()  # G_t, initialised from G_s
    g_ema = copy.deepcopy(g_source)
    common.requires_grad(g_source, False)
    common.requires_grad(g_ema, False)
    dataset = common.ImageFolder(args.target, generator.size)
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C
    latent_dim = generator.style_dim

    # METHOD: CDC's patch head, anchors and which D map each patch level reads
    patch_maps = common.patch_map_indices(discriminator)
    head = common.make_patch_head(discriminator).to(device)
    if args.highp > len(patch_maps):
        raise UserError(f"--highp {args.highp}: this discriminator has only {len(patch_maps)} patch maps")
    if generator.size < 32:
        raise UserError(f"RSSA's windows need a generator of at least 32 px, this one is {generator.size} px")
    blend = slot_blend(args.blend, generator.n_latent, generator.size).to(device)  # [n_latent]
    scc_layers, dcc_layers, dcc_grids = structure_layers(generator)

    # SHARED: --precision bf16 autocasts G and D
    runtime.autocast_forwards(args.precision, g_source, generator, discriminator)

    g_optim = common.make_adam(generator.parameters(), args.lr, args.g_reg_every)
    d_optim = common.make_adam(discriminator.parameters(), args.lr, args.d_reg_every)
    e_optim = common.make_adam(head.parameters(), args.lr, args.d_reg_every)
    if not args.ignore_source_optim and "g_optim" in source_ckpt and "d_optim" in source_ckpt:
        runtime.load_optimizer_moments(g_optim, source_ckpt["g_optim"])
        runtime.load_optimizer_moments(d_optim, source_ckpt["d_optim"])

    n_anchors = args.n_train or len(dataset)
    anchors = common.make_anchors(n_anchors, latent_dim, device)  # [K, D]
    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
    anchor_sample_z = common.sample_anchor_z(anchors, args.n_sample, args.subspace_std)  # [S, D]
    sampler = dataset.sampler(args.batch, device)
    mean_path_length = torch.zeros((), device=device)
    codes = None
    # SHARED: under torchrun D's minibatch stddev over the global batch, gradients averaged in each optimiser's step(),
    # the sampler's batches cut to this process's rows; nothing in one process
    runtime.distribute(discriminator, [g_optim, d_optim, e_optim], sampler)

    state = run.resume_state()
    if state is not None:
        run.start = runtime.restore_training_state(state, generator, g_ema, discriminator, g_optim, d_optim)
        head.load_state_dict(state["patch_head"])
        e_optim.load_state_dict(state["patch_optim"])
        anchors, sample_z, anchor_sample_z = state["anchors"].to(device), state["sample_z"].to(device), state["anchor_sample_z"].to(device)
        mean_path_length = state["mean_path_length"].to(device)
        sampler.load_state_dict(state["sampler"])
        codes = state.get("latent_codes")

    # METHOD: the target codes that span P (inverted once, cached in the run folder), P's projectors
    projectors = None
    if not args.no_compress:
        if codes is None:  # a resumed run holds the span's codes already
            span = span_indices(args.span, [os.path.basename(f) for f in dataset.files])
            codes = target_codes(args, g_source, dataset, run, device)[span]  # [N_span, L, D]
        codes = codes.to(device)  # [N_span, L, D]
        projectors = span_projectors(codes)  # [n_latent, D, D]

    # SHARED: the source half of the sample grids (G_s(z) without P, as the official generate.py), one fixed noise
    fixed_noise = [getattr(g_source.noises, f"noise_{k}") for k in range(g_source.num_layers)]
    with torch.no_grad():
        source_samples = g_source([sample_z], noise=fixed_noise)[0].cpu()
        source_anchor_samples = g_source([anchor_sample_z], noise=fixed_noise)[0].cpu()

    def checkpoint(i_next):
        return runtime.training_state(
            i_next, args, generator, g_ema, discriminator, g_optim, d_optim,
            patch_head=head.state_dict(), patch_optim=e_optim.state_dict(), anchors=anchors, sample_z=sample_z,
            anchor_sample_z=anchor_sample_z, mean_path_length=mean_path_length, sampler=sampler.state_dict(),
            latent_codes=None if codes is None else codes.cpu(), blend=blend.cpu(),
        )

    def write_samples(i):
        with torch.no_grad():
            adapted = g_ema([latents_wplus(g_ema, [sample_z], projectors, blend)], input_is_latent=True, noise=fixed_noise)[0]
            adapted_anchor = g_ema([latents_wplus(g_ema, [anchor_sample_z], projectors, blend)], input_is_latent=True, noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)
        runtime.save_comparison_grid(os.path.join(run.samples, f"anchors_{i:06d}.png"), source_anchor_samples, adapted_anchor)

    n_const = args.feat_const_batch
    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # METHOD: anchor iteration (image-level D, z from the anchor regions) or patch iteration (z ~ p_z)
        anchor_iter = common.is_anchor_iteration(i, args.subspace_freq)
        patch_level = not anchor_iter

        def sample_latents(batch):
            if anchor_iter:
                zs = [common.sample_anchor_z(anchors, batch, args.subspace_std)]
            else:
                zs = common.mixing_noise(batch, latent_dim, args.mixing, device)
            return [latents_wplus(generator, zs, projectors, blend, args.mixing_fix)]  # one W+ code [B, n_latent, D]

        def d_logits(images):
            if not patch_level:
                return discriminator(images)  # [B, 1]
            level = int(torch.randint(0, args.highp, ()))  # a fresh patch map per D call (official)
            return common.patch_logits(discriminator, head, images, level, patch_maps)  # [B, 1, h, w]

        # SHARED: D step
        real_img = next(sampler)  # [B, 3, H, W] (torchrun: this process's B/N rows)
        common.requires_grad(generator, False)
        common.requires_grad(discriminator, True)
        common.requires_grad(head, True)
        with torch.no_grad():
            fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch), input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        d_loss = common.d_logistic_loss(d_logits(real_img), d_logits(fake_img))
        discriminator.zero_grad()
        head.zero_grad()
        d_loss.backward()
        d_optim.step()
        e_optim.step()

        # SHARED: lazy R1 on the reals as seen by this iteration's D (patch logits averaged per image)
        r1_loss = torch.zeros((), device=device)
        if i % args.d_reg_every == 0:
            real_img.requires_grad_(True)
            real_pred = d_logits(real_img).flatten(1).mean(1)  # [B]
            r1_loss = common.d_r1_loss(real_pred, real_img)
            discriminator.zero_grad()
            head.zero_grad()
            # gamma / 2 * R1 * k (lazy regularisation)
            (args.r1 / 2 * r1_loss * args.d_reg_every).backward()
            d_optim.step()
            e_optim.step()

        # SHARED: G step
        common.requires_grad(generator, True)
        common.requires_grad(discriminator, False)
        common.requires_grad(head, False)
        generator.zero_grad()
        g_terms = common.BackwardEachTerm()  # each term's backward runs as soon as it is formed (less memory)
        fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch), input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        g_loss = common.g_nonsaturating_loss(d_logits(fake_img))
        g_terms.backward(g_loss)

        # METHOD: self-correlation consistency on N fresh z through P, fixed noise (per sample: each process its rows)
        scc_loss = torch.zeros((), device=device)
        path_z = None  # the latents the official path-length step reuses
        if not args.no_scc:
            path_z = torch.randn(n_const, latent_dim, device=device)  # [N, D]
            with torch.no_grad():
                w_src = latents_wplus(g_source, [path_z], projectors, blend)  # [N, L, D], G_s's own mapping
                _, feats_src = runtime.generate_rows(g_source, [w_src], input_is_latent=True, randomize_noise=False, return_feats=True,
                                                    feats_upto=scc_layers[-1])
            w_tgt = latents_wplus(generator, [path_z], projectors, blend)  # [N, L, D], G_t's mapping
            _, feats_tgt = runtime.generate_rows(generator, [w_tgt], input_is_latent=True, randomize_noise=False, return_feats=True,
                                                feats_upto=scc_layers[-1])
            scc_loss = self_correlation_loss([feats_src[k] for k in scc_layers], [feats_tgt[k] for k in scc_layers])
            g_terms.backward(args.scc_wt * scc_loss)

        # METHOD: disturbance correlation consistency every dcc-every-th iteration (every one without L_scc)
        dcc_loss = torch.zeros((), device=device)
        if not args.no_dcc and i % (1 if args.no_scc else args.dcc_every) == 0:
            z_anchor = torch.randn(1, latent_dim, device=device)  # [1, D]
            z_iid = torch.randn(n_const, latent_dim, device=device)  # [N, D]
            # the disturbed codes z = 0.85 z_a + 0.15 n_i (official: built, then left for the path-length step)
            path_z = 0.85 * z_anchor + 0.15 * z_iid  # [N, D]
            z = path_z if args.dcc_latents == "disturbed" else z_iid
            dcc_projectors = projectors if args.dcc_compress else None
            with torch.no_grad():
                w_src = latents_wplus(g_source, [z], dcc_projectors, blend)  # [N, L, D]
                _, feats_src = runtime.generate_rows(g_source, [w_src], input_is_latent=True, randomize_noise=False, return_feats=True,
                                                    feats_upto=dcc_layers[-1])
            w_tgt = latents_wplus(generator, [z], dcc_projectors, blend)  # [N, L, D]
            _, feats_tgt = runtime.generate_rows(generator, [w_tgt], input_is_latent=True, randomize_noise=False, return_feats=True,
                                                feats_upto=dcc_layers[-1])
            # L_dcc couples the N latents (pairs j < k): every process's rows gathered (autograd flows back to each),
            # so every process computes the single-process loss of all N (runtime.py,
            # 'Several processes'; in one process gather returns its input)
            feats_src, feats_tgt = runtime.gather(feats_src, n_const), runtime.gather(feats_tgt, n_const)
            dcc_loss = disturbance_correlation_loss(feats_src, feats_tgt, dcc_grids)
            g_terms.backward(args.dcc_wt * dcc_loss)
        # L_G + lambda_scc L_scc + lambda_dcc L_dcc, term by term
        g_terms.finish()
        g_optim.step()

        # SHARED: lazy path-length regularisation, through P (official: on the structure losses' codes)
        path_loss = torch.zeros((), device=device)
        if i % args.g_reg_every == 0:
            if args.path_latents == "fresh" or path_z is None:
                path_batch = max(1, args.batch // args.path_batch_shrink)
                zs = common.mixing_noise(path_batch, latent_dim, args.mixing, device)
            else:
                zs = [path_z]
            fake_img, latents = runtime.generate_rows(generator, [latents_wplus(generator, zs, projectors, blend, args.mixing_fix)],
                                                     input_is_latent=True, return_latents=True)
            path_loss, mean_path_length, _ = common.g_path_regularize(fake_img, latents, mean_path_length, batch=len(zs[0]))
            generator.zero_grad()
            (args.path_regularize * args.g_reg_every * path_loss).backward()
            g_optim.step()

        # SHARED: EMA, the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        common.accumulate(g_ema, generator, common.EMA_DECAY)
        run.end_iteration(i, {"d": d_loss, "g": g_loss, "scc": scc_loss, "dcc": dcc_loss, "r1": r1_loss,
                              "path": path_loss, "mean_path": mean_path_length})
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
