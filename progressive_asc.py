"""Progressive few-shot adaptation with align-free spatial correlation (Moon, Kim, Heo, AAAI 2023).

Adapts a source StyleGAN2 G_s to a few target images on top of CDC (anchors, image-level / patch-level D,
distance consistency). The reference is not the frozen source but the *progressive* one, G_{n-alpha}: the
ordinary EMA generator, which trails the current G_n and moves with it, so the constraint relaxes as training
goes. On top of CDC's instance-level distance consistency (IDC, here against G_{n-alpha}) the align-free
spatial correlation (ASC) keeps the correlation between pairs of *positions* p, q inside one sample: the
optical flow from G_{n-alpha}(z) to G_n(z) says where position p went, so G_n is read at p + flow(p).

Objective (paper numbering (5)-(10); the PDF was not available here, so the mapping of the numbers to the
terms is our reconstruction from a summary, the framework figure and the official code):
    (5)  M = Farneback( G_{n-alpha}(z), G_n(z) )                      flow, EMA positions -> current positions
    (6)  p ~ pi(p) ∝ [blurred Sobel of G_n(z)]_l (p) * 1[|M_l(p)| <= eta-quantile],  q ~ U,  M_l = 2 s_l pairs
    (7)  f_{n-alpha}(p), f_{n-alpha}(q) at integer positions;  f_n(p + M_l(p)), f_n(q + M_l(q)) by RoIAlign
    (8)  phi = softmax over all pairs k of all layers l of cos(f(p_k), f(q_k))        (one softmax per sample)
    (9)  L_asc = KL( phi_{n-alpha} || phi_n )
    (10) L_G = L_adv + lambda_prog ( lambda_idc L_idc + lambda_asc L_asc ),  lambda_prog = 1000, lambda_idc = 1,
         lambda_asc = 200 (code: 400 * LFCw with LFCw = 0.5), L_idc = CDC's L_dist with G_{n-alpha} as reference
    G_{n-alpha} <- d G_{n-alpha} + (1 - d) G_n after every iteration, d = 0.5 ** (32 / 10000) = 0.997784.

Differs from cdc.py:
  - the reference of L_dist (here L_idc) is g_ema, updated every iteration, not the frozen G_s;
  - the new L_asc term on a fresh batch of feat_const_batch latents; on a GPU its CPU optical flow runs in a
    thread pool while the IDC forwards run (on a CPU inline: 4 ms per batch at 64 px);
  - anchors: one per target image when there are more than 4, else 1 (official `n_train`);
  - sample grids every 1000 iterations (official img_freq).

Where the official code (arith3/Progressive-Few-Shot-GAN-Adaptation, train.py, run_train.sh) differs from the
paper, this file follows the code (the values of run_train.sh where its flags differ from argparse's defaults:
--LFCw 0.5, --cutoff 0.6, --blur 7) and keeps the paper-literal variant behind a flag:
  --asc-softmax per_layer    one softmax per layer (code: one softmax over the 992 pairs of all layers)
  --flow-magnitude l2        Euclidean flow magnitude for the eta mask (code: |dx| + |dy|)
  --sobel-padding replicate  no spurious border edges (code: zero padding on the [-1, 1] image)
  --flow-gray rgb            COLOR_RGB2GRAY for the flow input (code: COLOR_BGR2GRAY on RGB data)
  --asc-sampler grid_sample  bilinear grid_sample at p + M(p) (code: RoIAlign on a 1x1 box, which averages
                             2 or 4 points on ~1% of boxes through float32 rounding)
Ablations: --no-flow (aligned positions, no mask), --no-pred (uniform p), --no-cutoff (no mask), --asc-ref / --idc-ref
source (the frozen G_s as reference, the code without --use_ema / --use_rel_ema), --no-asc, --no-idc; without the
mask p is drawn from the raw edge map, as the official code (it min-max normalises only under the mask).
Layers: --asc-layers official (default) is the official fixed list 1..10 at every size; --asc-layers to-half
(1 .. num_layers - 3, up to size/2) is our scaling rule, equal at 256 px, deeper at 512 / 1024 px.
Speed at the cost of faithfulness (off by default): --asc-latents shared computes L_asc on L_idc's latents (the
spec's optional fusion), saving one G_n forward + backward and one G_{n-alpha} forward per iteration; the two
terms then see the same z instead of independent draws.
Not reproduced (no effect on the values): g_ema's ASC forward with gradients (here no_grad), the per-point
Python loop with host syncs (here one roi_align per layer), the sequential per-image flow (here a thread
pool on a GPU), unseeded NumPy and the random sigma draw of transforms.GaussianBlur (here every draw is from torch's
seeded RNG), DataParallel, the dead d_ema / extra_ema, and the NaN crash of the min-max normalisation when a
sampling map is constant and the multinomial crash of an all-zero raw map (here that sample's p falls back to
uniform).
"""

import argparse
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

import common
import runtime
from common import UserError
from checkpoints import load_checkpoint

# Farneback parameters of the official calcOpticalFlow (winsize comes from the schedule below)
FARNEBACK = dict(pyr_scale=0.5, levels=3, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)
WINSIZE_CAP = 32.0  # the official schedule multiplies while winsize < 32
# the official Sobel module: twice the standard kernels (cross-correlation), G_y = G_x^T
SOBEL_X = ((2.0, 0.0, -2.0), (4.0, 0.0, -4.0), (2.0, 0.0, -2.0))
ASC_WEIGHT_FACTOR = 400  # lambda_asc = 400 * LFCw (official code)
OFFICIAL_ASC_LAST_LAYER = 10  # official --LFC_layers "1,...,10" at every resolution
ASC_LAYER_RULES = ("official", "to-half")  # the named --asc-layers lists (asc_layer_list)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Progressive few-shot adaptation with ASC (Moon et al., AAAI 2023)")
    runtime.add_common_args(parser, origin="official run_train.sh", sample_every=1000)
    # METHOD: progressive reference + instance-level distance consistency (CDC's loss against g_ema)
    parser.add_argument("--kl-wt", type=float, default=1000, help="lambda_prog, weight of L_idc and factor of L_asc (default 1000: official code)")
    parser.add_argument("--feat-const-batch", type=int, default=4, help="latents per L_idc batch and per L_asc batch (default 4: official code)")
    parser.add_argument("--idc-ref", choices=["ema", "source"], default="ema",
                        help="reference of L_idc: ema = G_{n-alpha} (official --use_rel_ema, default); source = the frozen G_s (CDC)")
    parser.add_argument("--no-idc", action="store_true", help="ablation: drop L_idc (official --no_rel)")
    # METHOD: align-free spatial correlation
    parser.add_argument("--lfcw", type=float, default=0.5,
                        help="lambda_asc = 400 * lfcw (default 0.5, i.e. lambda_asc 200 as the paper: run_train.sh; official argparse 0.4)")
    parser.add_argument("--asc-layers", default="official",
                        help="generator feature indices of L_asc: official = the official --LFC_layers 1..10 at every size (default: "
                             "official train.py; capped at the last layer below 128 px, e.g. 1..6 at 32 px); to-half = 1 .. num_layers - 3, "
                             "every styled conv from 8^2 to size/2 (our scaling rule, NOT the official list above 256 px: 1..12 at 512, "
                             "1..14 at 1024; equal at 256); or comma-separated indices")
    parser.add_argument("--asc-ref", choices=["ema", "source"], default="ema",
                        help="reference of L_asc: ema = G_{n-alpha} (official --use_ema, default); source = the frozen G_s")
    parser.add_argument("--cutoff", type=float, default=0.6,
                        help="eta, flow-magnitude quantile above which p is never drawn (default 0.6: run_train.sh and paper; official argparse 0.8)")
    parser.add_argument("--blur", type=int, default=7, help="Gaussian blur of the Sobel map, kernel size = sigma (default 7: run_train.sh; official argparse 5)")
    parser.add_argument("--winsize", type=float, default=16, help="Farneback window at the start (default 16: official code)")
    parser.add_argument("--winsize-inc", type=float, default=1.0002, help="window growth factor per iteration while below 32 (default 1.0002: official code)")
    parser.add_argument("--no-flow", action="store_true", help="ablation: no flow, G_n read at the same p, q, no mask (official without --use_flow)")
    parser.add_argument("--no-pred", action="store_true", help="ablation: p uniform instead of the edge map (official without --use_pred)")
    parser.add_argument("--no-cutoff", action="store_true", help="ablation: no eta mask (official without --use_flow_pred)")
    parser.add_argument("--no-asc", action="store_true", help="ablation: drop L_asc (official without --LFC)")
    parser.add_argument("--asc-softmax", choices=["all", "per_layer"], default="all",
                        help="all: one softmax over the pairs of all layers, official code (default); per_layer: one per layer, paper reading")
    parser.add_argument("--flow-magnitude", choices=["l1", "l2"], default="l1", help="flow magnitude for eta: l1 official code (default); l2 paper reading")
    parser.add_argument("--sobel-padding", choices=["zeros", "replicate"], default="zeros",
                        help="Sobel padding: zeros, official code (default; spurious border edges); replicate (paper-literal fix)")
    parser.add_argument("--flow-gray", choices=["bgr", "rgb"], default="bgr",
                        help="grey conversion of the flow input: bgr = COLOR_BGR2GRAY on RGB data, official code (default); rgb = COLOR_RGB2GRAY")
    parser.add_argument("--asc-sampler", choices=["roi_align", "grid_sample"], default="roi_align",
                        help="reading G_n at p + M(p): roi_align on a 1x1 box, official code (default); grid_sample, plain bilinear (paper)")
    parser.add_argument("--asc-latents", choices=["fresh", "shared"], default="fresh",
                        help="fresh: L_asc on its own batch z ~ N(0, I), official code (default); shared: L_asc reuses L_idc's latents "
                             "and forwards, one G_n and one G_{n-alpha} forward fewer per iteration (faster, NOT the official sampling)")
    # METHOD: relaxed realism (anchors + patch discriminator), as CDC
    parser.add_argument("--subspace-freq", type=int, default=4, help="anchor iteration every k iterations (default 4: official code)")
    parser.add_argument("--subspace-std", type=float, default=0.1, help="sigma of the anchor regions (default 0.1: official code)")
    parser.add_argument("--n-train", type=int, default=None, help="number of anchors (default: number of target images if more than 4, else 1: official code)")
    parser.add_argument("--highp", type=int, default=1, help="patch map drawn from the first k of CDC's 4 maps (default 1: the 32x32 map, official code)")
    # SHARED: StyleGAN2 regularisers, as rosinality / the official code
    parser.add_argument("--r1", type=float, default=10, help="R1 weight gamma (default 10: official code)")
    parser.add_argument("--path-regularize", type=float, default=2, help="path-length weight (default 2: official code)")
    parser.add_argument("--path-batch-shrink", type=int, default=2, help="path-length batch divisor (default 2: official code)")
    parser.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (default 16: official code)")
    parser.add_argument("--g-reg-every", type=int, default=4, help="lazy path-length interval (default 4: official code)")
    parser.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability on non-anchor iterations (default 0.9: official code)")
    parser.add_argument("--ignore-source-optim", action="store_true",
                        help="start Adam from zero moments instead of the source run's g_optim/d_optim (official: loaded when present)")
    args = runtime.parse_args_or_demo(parser, argv, "progressive_asc", **runtime.DEMO_SCHEDULE)
    runtime.check_common_args(args)
    runtime.check_discriminator_batch(args.batch)
    if args.feat_const_batch < 3:
        raise UserError("--feat-const-batch must be at least 3 (each row needs two other samples to form a distribution)")
    if args.subspace_freq < 1 or not 1 <= args.highp <= 4:
        raise UserError("--subspace-freq must be >= 1 and --highp in 1..4")
    if not 0 <= args.cutoff <= 1 or args.blur < 0 or (args.blur and args.blur % 2 == 0) or args.winsize < 1 or args.winsize_inc < 1:
        raise UserError("--cutoff must be in [0, 1], --blur 0 or odd, --winsize >= 1 and --winsize-inc >= 1")
    if args.asc_latents == "shared" and (args.no_asc or args.no_idc or args.asc_ref != args.idc_ref):
        raise UserError("--asc-latents shared needs both L_asc and L_idc, with the same reference (--asc-ref = --idc-ref)")
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD: the instance-level distance consistency (CDC's loss, here against G_{n-alpha})


def pairwise_similarity_logprobs(feats, layer_idx):
    """log softmax_j over j != i (j ascending) of cos(feats[l_i][i], feats[l_i][j]): [N, N-1].

    feats: list of per-layer tensors [N, C, H, W]; layer_idx: int tensor [N], the layer of row i.
    One matrix product per distinct layer used.
    """
    n = layer_idx.shape[0]
    sim = feats[0].new_empty(n, n)  # [N, N]
    for layer in torch.unique(layer_idx).tolist():
        rows = (layer_idx == layer).nonzero().squeeze(1)  # rows whose anchor uses this layer
        flat = F.normalize(feats[layer].flatten(1), dim=1)  # [N, C*H*W], unit rows
        # cos(f_i, f_j) = <f_i / |f_i|, f_j / |f_j|>
        sim[rows] = flat[rows] @ flat.t()  # [r, N]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim[off_diagonal].view(n, n - 1)  # [N, N-1], j != i in ascending order
    # log y_i = log softmax_j(sim_ij)
    return F.log_softmax(sim, dim=1)


def distance_consistency_loss(feats_src, feats_tgt, layer_idx):
    """L_idc without the lambda weight: CDC's L_dist with G_{n-alpha} (or G_s) as the reference side.

    feats_src / feats_tgt: lists of per-layer tensors [N, C, H, W] of the reference and of G_n for the same z;
    layer_idx: int tensor [N], the layer used for anchor row i. Official value:
        mean over the N(N-1) entries of P_ref (log P_ref - log P_n)   (= nn.KLDivLoss()(log P_n, P_ref))
    Gradients reach only the adapted side.
    """
    log_p_src = pairwise_similarity_logprobs([f.detach() for f in feats_src], layer_idx)  # [N, N-1]
    log_p_tgt = pairwise_similarity_logprobs(feats_tgt, layer_idx)  # [N, N-1]
    # KL(P_ref || P_n) entries: P_ref (log P_ref - log P_n)
    entries = log_p_src.exp() * (log_p_src - log_p_tgt)
    return entries.mean()


# ------------------------------------------------------------------------------------------------
# METHOD: the align-free spatial correlation


def farneback_winsize(i, start=16.0, inc=1.0002, cap=WINSIZE_CAP):
    """Farneback window of iteration i (float; cv2 gets int()): the official `if w < 32: w *= inc`, run once
    per iteration before the flow, from `start` (int 17 from i = 303, 32 from i = 3466 on: 3467 products)."""
    w = float(start)
    for _ in range(i + 1):
        if w >= cap:
            break
        w *= inc
    return w


def flow_input(image, gray="bgr"):
    """[3, H, W] float CPU tensor -> [H, W] uint8: per-image min-max to 0..255 over all channels, then
    COLOR_BGR2GRAY (official, applied to RGB data) or COLOR_RGB2GRAY."""
    import cv2  # imported on first use: bad input fails fast

    a = image.permute(1, 2, 0).numpy() * 255  # [H, W, 3]
    a = cv2.normalize(a, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)
    return cv2.cvtColor(a, cv2.COLOR_BGR2GRAY if gray == "bgr" else cv2.COLOR_RGB2GRAY)


def farneback_one(image_ref, image_cur, winsize, gray="bgr"):
    """Eq. (5) for one sample: [H, W, 2] float32 flow (dx, dy) in pixels with ref(y, x) ~ cur(y + dy, x + dx)."""
    import cv2

    return cv2.calcOpticalFlowFarneback(flow_input(image_ref, gray), flow_input(image_cur, gray), None,
                                        winsize=int(winsize), **FARNEBACK)


def start_flow(images_ref, images_cur, winsize, gray="bgr", pool=None):
    """Start Eq. (5) for a batch: one Farneback call per sample, in `pool` when given (OpenCV releases the
    GIL). images_*: [B, 3, H, W] (any device); returns a handle for finish_flow."""
    images_ref = images_ref.detach().float().cpu()  # one transfer per batch
    images_cur = images_cur.detach().float().cpu()
    jobs = [(images_ref[b], images_cur[b], winsize, gray) for b in range(images_ref.shape[0])]
    if pool is None:
        return [farneback_one(*job) for job in jobs]
    return [pool.submit(farneback_one, *job) for job in jobs]


def finish_flow(handle, device="cpu"):
    """[B, 2, H, W] float32 flow on `device` from start_flow's handle (waits for the pool)."""
    flows = [f.result() if hasattr(f, "result") else f for f in handle]
    return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous().to(device)


def farneback_flow(images_ref, images_cur, winsize, gray="bgr", pool=None):
    """Eq. (5): [B, 2, H, W] flow from G_{n-alpha}(z) (prev) to G_n(z) (next), official parameters."""
    return finish_flow(start_flow(images_ref, images_cur, winsize, gray, pool), images_ref.device)


def flow_magnitude(flow, kind="l1"):
    """[B, 2, h, w] -> [B, h, w]: |dx| + |dy| (official) or sqrt(dx^2 + dy^2)."""
    if kind == "l1":
        return flow[:, 0].abs() + flow[:, 1].abs()
    return flow.pow(2).sum(1).sqrt()


def flow_cutoff(flow, eta, kind="l1"):
    """The eta-quantile of the flow magnitude over the whole batch at image resolution (a 0-dim tensor, no sync)."""
    return torch.quantile(flow_magnitude(flow, kind).flatten(), eta)


def edge_map(images, blur=7, padding="zeros"):
    """Importance map of Eq. (6) before pooling: [B, 1, H, W] = GaussianBlur_{k=blur, sigma=blur}( |Sobel(gray)| ).

    gray = torchvision's Grayscale of the [-1, 1] image (0.2989 R + 0.587 G + 0.114 B); the official Sobel has
    twice the standard kernels and zero padding; |.| is the L2 norm of (g_x, g_y). No gradient.
    """
    from torchvision.transforms import functional as TF

    with torch.no_grad():
        gray = TF.rgb_to_grayscale(images.detach())  # [B, 1, H, W]
        kx = torch.tensor(SOBEL_X, dtype=gray.dtype, device=gray.device)
        kernel = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: G_x, G_y
        if padding == "zeros":
            grad = F.conv2d(gray, kernel, padding=1)  # [B, 2, H, W]
        else:
            grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernel)
        edges = grad.pow(2).sum(1, keepdim=True).sqrt()  # [B, 1, H, W]
        if blur > 0:
            edges = TF.gaussian_blur(edges, [blur, blur], [float(blur), float(blur)])
    return edges


def sampling_distribution(edges, s, flow_s=None, cut=None, scale=1.0, kind="l1"):
    """Eq. (6): [B, s^2] sampling weights of p at one resolution s.

    edges: [B, 1, H, W] edge map; flow_s: [B, 2, s, s] block-mean flow in feature pixels; cut: the
    image-resolution eta-quantile, compared with the pooled magnitude against cut * s / H.
    With the mask (flow_s and cut given; official use_flow and use_flow_pred): block means, masked positions
    set to 0, then min-max normalised per sample, so the minimum gets weight 0; a constant map (official: NaN
    and a crash) gives uniform weights. Without (flow_s or cut None: the --no-flow and --no-cutoff
    ablations): the raw block means, as the official code, which normalises only under both switches, so
    every position with an edge keeps a weight > 0; an all-zero map (official: a multinomial crash) gives
    uniform weights.
    """
    pm = F.adaptive_avg_pool2d(edges, s).relu().flatten(1).nan_to_num()  # [B, s^2]
    if flow_s is None or cut is None:
        return torch.where(pm.sum(1, keepdim=True) > 0, pm, torch.ones_like(pm))  # [B, s^2], unnormalised
    moved = flow_magnitude(flow_s, kind).flatten(1) > cut * scale  # [B, s^2]
    pm = pm.masked_fill(moved, 0)
    lo, hi = pm.aminmax(dim=1, keepdim=True)  # [B, 1]
    span = hi - lo
    # pi(p) = (pm(p) - min pm) / (max pm - min pm)
    return torch.where(span > 0, (pm - lo) / span.clamp_min(torch.finfo(pm.dtype).tiny), torch.ones_like(pm))


def gather_points(feat, idx):
    """[B, C, s, s] at flat integer positions idx [B, K] -> [B, C, K]."""
    return feat.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, feat.shape[1], -1))


def warped_points(feat, idx, flow_s, sampler="roi_align"):
    """Eq. (7), current side: feat [B, C, s, s] read at p + M(p) for flat positions idx [B, K], with flow_s
    [B, 2, s, s] the block-mean flow in feature pixels. -> [B, C, K].

    roi_align (official): one call for all B K points, a 1x1 box [x - .5, y - .5, x + .5, y + .5] around the
    displaced point, output 1x1, spatial_scale 1, sampling_ratio -1, aligned False (bilinear at the point; 0
    outside [-1, s]; float32 rounding makes ~1% of boxes wider than 1, which then average 2 or 4 points).
    grid_sample: plain bilinear at the point, border padding inside [-1, s], 0 outside.
    """
    from torchvision.ops import roi_align

    b, c, s, _ = feat.shape
    k = idx.shape[1]
    shift = gather_points(flow_s.to(feat.dtype), idx)  # [B, 2, K]
    xa = (idx % s).to(feat.dtype) + shift[:, 0]  # [B, K]
    ya = torch.div(idx, s, rounding_mode="floor").to(feat.dtype) + shift[:, 1]  # [B, K]
    if sampler == "roi_align":
        image_index = torch.arange(b, device=feat.device, dtype=feat.dtype).view(b, 1).expand(b, k)  # [B, K]
        boxes = torch.stack([image_index, xa - 0.5, ya - 0.5, xa + 0.5, ya + 0.5], -1).view(b * k, 5)
        out = roi_align(feat, boxes, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False)  # [B K, C, 1, 1]
        return out.view(b, k, c).transpose(1, 2)
    grid = torch.stack([xa / (s - 1) * 2 - 1, ya / (s - 1) * 2 - 1], -1).unsqueeze(1)  # [B, 1, K, 2]
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=True).squeeze(2)  # [B, C, K]
    inside = (xa >= -1) & (xa <= s) & (ya >= -1) & (ya <= s)  # [B, K]
    return out * inside.unsqueeze(1)


def asc_similarities(feats_ref, feats_cur, edges, flow, layers, size, cutoff=0.6, use_pred=True, use_cutoff=True,
                     kind="l1", sampler="roi_align"):
    """Eq. (6)-(8) before the softmax: per layer l of `layers`, M_l = 2 s_l pairs (p_k, q_k) per sample,
    p ~ the masked edge map (uniform with use_pred=False), q uniform, both with replacement, paired 1:1;
    cos(f(p_k), f(q_k)) of the reference at integer positions and of G_n at the flow-displaced ones.

    feats_*: per-layer [B, C, s, s] lists; edges: [B, 1, H, W]; flow: [B, 2, H, W] (None: G_n read at the same
    positions, no mask). Returns (S_ref [B, sum M_l], S_cur [B, sum M_l], [M_l]).
    """
    cut = flow_cutoff(flow, cutoff, kind) if flow is not None and use_cutoff else None
    pooled = {}  # per resolution: (flow_s, sampling weights), shared by the two layers of a resolution
    sims_ref, sims_cur, sizes = [], [], []
    for layer in layers:
        f_ref, f_cur = feats_ref[layer].detach(), feats_cur[layer]
        b, s = f_cur.shape[0], f_cur.shape[-1]
        m, scale = 2 * s, s / size
        if s not in pooled:
            flow_s = F.adaptive_avg_pool2d(flow, s) * scale if flow is not None else None  # [B, 2, s, s]
            weights = sampling_distribution(edges, s, flow_s, cut, scale, kind) if use_pred else None
            pooled[s] = (flow_s, weights)
        flow_s, weights = pooled[s]
        if use_pred:
            idx_p = torch.multinomial(weights, m, replacement=True)  # [B, m]
        else:
            idx_p = torch.randint(0, s * s, (b, m), device=f_cur.device)
        idx_q = torch.randint(0, s * s, (b, m), device=f_cur.device)  # [B, m]
        idx = torch.cat([idx_p, idx_q], 1)  # [B, 2m]
        ref = gather_points(f_ref, idx)  # [B, C, 2m]
        cur = warped_points(f_cur, idx, flow_s, sampler) if flow is not None else gather_points(f_cur, idx)
        # (8) cos(f(p_k), f(q_k)), eps 1e-8 as nn.CosineSimilarity
        sims_ref.append(F.cosine_similarity(ref[..., :m], ref[..., m:], dim=1, eps=1e-8))  # [B, m]
        sims_cur.append(F.cosine_similarity(cur[..., :m], cur[..., m:], dim=1, eps=1e-8))
        sizes.append(m)
    return torch.cat(sims_ref, 1), torch.cat(sims_cur, 1), sizes


def asc_kl(sim_ref, sim_cur, sizes=None):
    """Eq. (8)-(9): KL(phi_{n-alpha} || phi_n) with 'mean' reduction (official nn.KLDivLoss(): / B sum M_l).

    phi = softmax over all pairs of a sample (sizes None, official) or over each layer's block of `sizes`.
    sim_*: [B, sum M_l]; returns a 0-dim tensor in sim_cur's dtype.
    """
    # Precision: log_softmax in float64, cast back. The KL is a small difference of log-probabilities near
    # -log(sum M_l) (~ -6.9 for 992 pairs), so float32 loses ~ulp(6.9) = 5e-7 per entry. Relative error of
    # the float32 loss (and of its gradient) against this KL evaluated in float64 on the same similarities,
    # median over 40 batches of 4 at iteration 0 of the demo (32 px source, g_ema vs g, 224 pairs):
    #   log_softmax in float32              2.1e-5 (grad 2.9e-6)
    #   official log(softmax), float32      5.8e-6 (grad 1.2e-6)
    #   float32 rewrite E_p[u + expm1(-u)] + log1p(y) - y,  y = E_p[expm1(-u)],  u = d - E_p[d],  d = S_ref - S_cur
    #                                       4.6e-8 (grad 4.4e-7), but expm1 overflows for |d| > 88
    #   log_softmax in float64 (this)       2.1e-8 (grad 2.6e-8): only the final float32 rounding, and as
    #                                       stable as log_softmax for any input.
    # On a 64 px random generator with G_n 1% away from G_{n-alpha} (KL 3e-8, 480 pairs) the same four give
    # 5.5e-3, 1.4e-3, 2.2e-7, 1.8e-8: float32 degrades as G_n -> G_{n-alpha}. The cost ([B, ~1000] values) is nil.
    ref, cur = sim_ref.detach().double(), sim_cur.double()  # [B, sum M_l]
    if sizes is None:
        # log phi = log softmax over the sample's pairs
        log_ref, log_cur = F.log_softmax(ref, 1), F.log_softmax(cur, 1)  # [B, sum M_l]
    else:
        # log phi = log softmax over each layer's block
        log_ref = torch.cat([F.log_softmax(x, 1) for x in ref.split(sizes, 1)], 1)  # [B, sum M_l]
        log_cur = torch.cat([F.log_softmax(x, 1) for x in cur.split(sizes, 1)], 1)
    # (9) mean over B sum M_l of phi_ref (log phi_ref - log phi_cur)
    return (log_ref.exp() * (log_ref - log_cur)).mean().to(sim_cur.dtype)


def asc_layer_list(num_layers, rule="official"):
    """Generator feature indices of L_asc for a generator with num_layers styled convs (2 log2(size) - 3).

    official: the official --LFC_layers 1..10 (train.py), the same list at every size (8^2..128^2), capped at
              num_layers - 1 for a generator that has fewer (below 128 px: 1..6 at 32 px, up to the output size);
    to-half:  1..num_layers - 3, every styled conv from 8^2 to size/2 (not the official list: equal to it at
              256 px, 1..12 at 512 px, 1..14 at 1024 px; 1..4 at 32 px).
    """
    if rule == "official":
        return list(range(1, min(OFFICIAL_ASC_LAST_LAYER, num_layers - 1) + 1))
    return list(range(1, num_layers - 2))


def default_asc_layers(g, rule="official"):
    """asc_layer_list for generator g."""
    return asc_layer_list(g.num_layers, rule)


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)

    # SHARED: source checkpoint, target images, run folder
    models, source_ckpt = load_checkpoint(args.source, require=("g", "g_ema", "d"), device=device)
    g_source, g_ema, discriminator = models["g"], models["g_ema"], models["d"]  # G_s = the source's non-EMA g
    generator = copy.deepcopy(g_source).train()  # G_n, initialised from G_s
    g_source_ema = copy.deepcopy(g_ema)  # only for the source half of the sample grids
    common.requires_grad(g_source, False)
    common.requires_grad(g_ema, False)  # G_{n-alpha}: frozen, moved only by the EMA
    dataset = common.ImageFolder(args.target, generator.size)
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C
    latent_dim = generator.style_dim

    # METHOD: references and ASC layers
    idc_ref = g_ema if args.idc_ref == "ema" else g_source
    asc_ref = g_ema if args.asc_ref == "ema" else g_source
    try:
        if args.asc_layers in ASC_LAYER_RULES:
            asc_layers = default_asc_layers(generator, args.asc_layers)
        else:
            asc_layers = [int(x) for x in args.asc_layers.split(",")]
    except ValueError:
        raise UserError(f"--asc-layers {args.asc_layers!r}: expected {' or '.join(ASC_LAYER_RULES)} or comma-separated integers") from None
    if not asc_layers or not all(0 <= layer < generator.num_layers for layer in asc_layers):
        raise UserError(f"--asc-layers must be in 0..{generator.num_layers - 1} for a {generator.size}-px generator")
    # METHOD: CDC's patch head, anchors and which D map each patch level reads
    patch_maps = common.patch_map_indices(discriminator)
    head = common.make_patch_head(discriminator).to(device)
    if args.highp > len(patch_maps):
        raise UserError(f"--highp {args.highp}: this discriminator has only {len(patch_maps)} patch maps")

    # SHARED: --precision bf16 autocasts G and D
    runtime.autocast_forwards(args.precision, g_source, g_ema, generator, discriminator)

    g_optim = common.make_adam(generator.parameters(), args.lr, args.g_reg_every)
    d_optim = common.make_adam(discriminator.parameters(), args.lr, args.d_reg_every)
    e_optim = common.make_adam(head.parameters(), args.lr, args.d_reg_every)
    if not args.ignore_source_optim and "g_optim" in source_ckpt and "d_optim" in source_ckpt:
        runtime.load_optimizer_moments(g_optim, source_ckpt["g_optim"])
        runtime.load_optimizer_moments(d_optim, source_ckpt["d_optim"])

    n_anchors = args.n_train or (len(dataset) if len(dataset) > 4 else 1)
    anchors = common.make_anchors(n_anchors, latent_dim, device)  # [K, D]
    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
    anchor_sample_z = common.sample_anchor_z(anchors, args.n_sample, args.subspace_std)  # [S, D]
    sampler = dataset.sampler(args.batch, device)
    mean_path_length = torch.zeros((), device=device)
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

    # SHARED: the source half of the sample grids (the source's g_ema), one fixed noise for both halves
    fixed_noise = [getattr(g_source_ema.noises, f"noise_{k}") for k in range(g_source_ema.num_layers)]
    with torch.no_grad():
        source_samples = g_source_ema([sample_z], noise=fixed_noise)[0].cpu()
        source_anchor_samples = g_source_ema([anchor_sample_z], noise=fixed_noise)[0].cpu()
    del g_source_ema

    def checkpoint(i_next):
        return runtime.training_state(
            i_next, args, generator, g_ema, discriminator, g_optim, d_optim,
            patch_head=head.state_dict(), patch_optim=e_optim.state_dict(), anchors=anchors, sample_z=sample_z,
            anchor_sample_z=anchor_sample_z, mean_path_length=mean_path_length, sampler=sampler.state_dict(),
        )

    def write_samples(i):
        with torch.no_grad():
            adapted = g_ema([sample_z], noise=fixed_noise)[0]
            adapted_anchor = g_ema([anchor_sample_z], noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)
        runtime.save_comparison_grid(os.path.join(run.samples, f"anchors_{i:06d}.png"), source_anchor_samples, adapted_anchor)

    n_latent = generator.n_latent
    with ThreadPoolExecutor(max_workers=args.feat_const_batch) as flow_pool:
        for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
            # METHOD: anchor iteration (image-level D, z from the anchor regions) or patch iteration (z ~ p_z)
            anchor_iter = common.is_anchor_iteration(i, args.subspace_freq)
            patch_level = not anchor_iter

            def sample_latents(batch):
                if anchor_iter:
                    return [common.sample_anchor_z(anchors, batch, args.subspace_std)]
                return common.mixing_noise(batch, latent_dim, args.mixing, device)

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
                fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
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
            fake_img, _ = runtime.generate_rows(generator, sample_latents(args.batch))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
            g_loss = common.g_nonsaturating_loss(d_logits(fake_img))
            g_terms.backward(g_loss)

            # METHOD: ASC forwards first on a fresh batch z ~ N(0, I); the CPU flow (5) runs while IDC computes. Under
            # torchrun every process computes L_idc and L_asc on all N latents, identically (ASC draws its point pairs
            # per sample from the flow and edge maps of the whole batch): the single-process losses, not split
            asc_loss = torch.zeros((), device=device)
            if not args.no_asc:
                z_asc = torch.randn(args.feat_const_batch, latent_dim, device=device)  # [B, D]
                with torch.no_grad():
                    img_ref, feats_ref_asc = asc_ref([z_asc], return_feats=True)
                img_cur, feats_cur_asc = generator([z_asc], return_feats=True)
                winsize = farneback_winsize(i, args.winsize, args.winsize_inc)
                # on a GPU the flow threads overlap the IDC kernels; on a CPU they would only compete with torch's threads
                pool = flow_pool if device.type == "cuda" else None
                flow_job = None if args.no_flow else start_flow(img_ref, img_cur, winsize, args.flow_gray, pool)
            # METHOD: instance-level distance consistency against G_{n-alpha} on a fresh batch z ~ N(0, I)
            dist_loss = torch.zeros((), device=device)
            if not args.no_idc:
                if args.asc_latents == "fresh":
                    z = torch.randn(args.feat_const_batch, latent_dim, device=device)  # [N, D]
                # one layer per anchor row, uniform in {1, ..., n_latent - 2}
                layer_idx = torch.randint(1, n_latent - 1, (args.feat_const_batch,))  # [N], on the CPU: no device sync
                if args.asc_latents == "shared":  # the ASC forwards already hold every layer of G_{n-alpha}(z) and G_n(z)
                    feats_src, feats_tgt = feats_ref_asc, feats_cur_asc
                else:
                    # both generators stop at the deepest layer used (the official code also renders the image)
                    deepest = int(layer_idx.max())
                    with torch.no_grad():
                        _, feats_src = idc_ref([z], return_feats=True, feats_upto=deepest)
                    _, feats_tgt = generator([z], return_feats=True, feats_upto=deepest)
                dist_loss = distance_consistency_loss(feats_src, feats_tgt, layer_idx)
            # METHOD: align-free spatial correlation (6)-(9)
            if not args.no_asc:
                edges = edge_map(img_cur, args.blur, args.sobel_padding)  # [B, 1, H, W]
                flow = None if flow_job is None else finish_flow(flow_job, device)  # [B, 2, H, W]
                sim_ref, sim_cur, sizes = asc_similarities(
                    feats_ref_asc, feats_cur_asc, edges, flow, asc_layers, generator.size, args.cutoff,
                    use_pred=not args.no_pred, use_cutoff=not args.no_cutoff, kind=args.flow_magnitude, sampler=args.asc_sampler)
                asc_loss = asc_kl(sim_ref, sim_cur, sizes if args.asc_softmax == "per_layer" else None)
            # (10) L_G + lambda_prog (L_idc + lambda_asc L_asc); one term: L_idc and L_asc can share G_n's forward
            g_terms.backward(args.kl_wt * (dist_loss + ASC_WEIGHT_FACTOR * args.lfcw * asc_loss))
            g_terms.finish()
            g_optim.step()

            # SHARED: lazy path-length regularisation (z ~ p_z with mixing, never anchors)
            path_loss = torch.zeros((), device=device)
            if i % args.g_reg_every == 0:
                path_batch = max(1, args.batch // args.path_batch_shrink)
                fake_img, latents = runtime.generate_rows(generator, common.mixing_noise(path_batch, latent_dim, args.mixing, device), return_latents=True)
                path_loss, mean_path_length, _ = common.g_path_regularize(fake_img, latents, mean_path_length, batch=path_batch)
                generator.zero_grad()
                (args.path_regularize * args.g_reg_every * path_loss).backward()
                g_optim.step()

            # SHARED: EMA (G_{n-alpha} <- d G_{n-alpha} + (1 - d) G_n), logging, samples, checkpoints
            common.accumulate(g_ema, generator, common.EMA_DECAY)
            run.end_iteration(i, {"d": d_loss, "g": g_loss, "idc": dist_loss, "asc": asc_loss, "r1": r1_loss,
                                  "path": path_loss, "mean_path": mean_path_length})
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
