"""CDC: Few-shot Image Generation via Cross-domain Correspondence (Ojha et al., CVPR 2021).

Adapts a source StyleGAN2 G_s to ~10 target images. The adapted G_{s->t} starts from G_s and keeps, for any
batch of latents, the same pairwise similarity structure between its samples as G_s has (cross-domain
distance consistency), while a discriminator that sees whole images only near a few "anchor" latents and
otherwise judges patches lets the rest of latent space be realistic only locally (relaxed realism).

Objective (paper, Eq. 3-5):
    y_i^{s,l}   = softmax_j( {cos(G_s^l(z_i), G_s^l(z_j))}_{j != i} )              (source, layer l)
    y_i^{s->t,l} = softmax_j( {cos(G_{s->t}^l(z_i), G_{s->t}^l(z_j))}_{j != i} )   (adapted, layer l)
    L_dist = E_{z_i} sum_{l,i} D_KL( y_i^{s->t,l} || y_i^{s,l} )
    L'_adv = E_{x~D_t}[log D_img(x)] + E_{z~Z_anch}[log(1 - D_img(G(z)))]
           + E_{x~D_t}[log D_patch(x)] + E_{z~p_z}[log(1 - D_patch(G(z)))]
    G* = argmin_G max_D  L'_adv + lambda L_dist

Where the official code (WisconsinAIVision/few-shot-gan-adaptation, train.py) differs from the paper, this
file follows the code by default and keeps the paper's variant behind a flag:
  - KL direction: the code computes KL(P_s || P_t) (`KLDivLoss(log P_t, P_s)`); the paper writes
    KL(P_t || P_s) (--kl-direction target_source).
  - KL reduction: the code averages over the N(N-1) entries (`reduction='mean'`, i.e. lambda/(N-1) times
    the batch-mean KL); the paper sums (--kl-reduction batchmean / sum).
  - Layers: the code uses one random generator layer per anchor row per iteration, uniform in
    {1, ..., n_latent - 2}; the paper sums over layers (--kl-layers all).
  - Adversarial loss: the code alternates: every `subspace_freq`-th iteration z comes from the anchor
    regions and D is image-level on real and fake; the other iterations use z ~ p_z (with style mixing) and
    the patch head on real and fake. The paper adds both terms in one objective.
  - Anchor noise sigma: 0.1 in the code (--subspace-std), 0.05 in the paper.
  - Source generator: `ckpt["g"]` (not `g_ema`) is both G_s and the start of G_{s->t}; `g_ema` starts from
    `ckpt["g_ema"]`; D from `ckpt["d"]`; the source run's optimiser moments are loaded when present.
  - R1 is taken on the reals as seen by the current D (with the defaults 16 is a multiple of 4, so every R1
    step falls on an anchor iteration and regularises the image-level D only), and the path-length mean
    starts at 0.
Official-code bugs that are not reproduced: D blocks evaluated twice and blocks after the patch map run
(here the patch D stops at its map), unseeded NumPy draws (here every draw is seeded), `module.` prefixes
and non-strict loads, only `g_ema` saved (here the full training state), the Python double loops.

Differs from the baseline StyleGAN2 fine-tuning loop (this file is the loop the other methods diff against):
  - L_dist between G_s and G_{s->t} features on a separate batch of `feat_const_batch` latents,
  - anchors and the image-level / patch-level D alternation, with CDC's patch head on D's 32x32 map.
"""

import argparse
import copy
import os

import torch
import torch.nn.functional as F

import common
import runtime
from common import UserError
from checkpoints import load_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CDC few-shot adaptation (Ojha et al., CVPR 2021)")
    runtime.add_common_args(parser)
    # METHOD: cross-domain distance consistency
    parser.add_argument("--kl-wt", type=float, default=1000, help="lambda, weight of L_dist (default 1000: official code)")
    parser.add_argument("--feat-const-batch", type=int, default=4, help="N+1 latents per L_dist batch (default 4: official code)")
    parser.add_argument("--kl-direction", choices=["source_target", "target_source"], default="source_target",
                        help="source_target: KL(P_s || P_t), official code (default); target_source: KL(P_t || P_s), paper")
    parser.add_argument("--kl-reduction", choices=["mean", "batchmean", "sum"], default="mean",
                        help="mean over the N(N-1) entries: official code (default); batchmean: KL per row averaged; sum: paper")
    parser.add_argument("--kl-layers", choices=["random", "all"], default="random",
                        help="random: one layer per row in {1..n_latent-2}, official code (default); all: sum over those layers, paper")
    parser.add_argument("--same-noise", action="store_true",
                        help="give G_s and G_{s->t} the same per-pixel noise in L_dist (official: independent noise; default off)")
    parser.add_argument("--no-dist", action="store_true", help="ablation: drop L_dist (plain fine-tuning; with --adv image the TGAN baseline)")
    # METHOD: relaxed realism (anchors + patch discriminator)
    parser.add_argument("--adv", choices=["both", "image", "patch"], default="both",
                        help="both: anchors with image-level D every --subspace-freq iterations, patch D otherwise (official, default); "
                             "image / patch: that D on every iteration with z ~ p_z (paper Fig. 5 ablations)")
    parser.add_argument("--subspace-freq", type=int, default=4, help="anchor iteration every k iterations (default 4: official argparse; run.sh uses 2)")
    parser.add_argument("--subspace-std", type=float, default=0.1, help="sigma of the anchor regions (default 0.1: official code; paper: 0.05)")
    parser.add_argument("--n-train", type=int, default=None, help="number of anchors (default: number of target images, as the paper; official --n_train 10)")
    parser.add_argument("--highp", type=int, default=1, help="patch map drawn from the first k of CDC's 4 maps (default 1: the 32x32 map, official code)")
    # SHARED: StyleGAN2 regularisers, as rosinality / the official code
    parser.add_argument("--r1", type=float, default=10, help="R1 weight gamma (default 10: official code)")
    parser.add_argument("--path-regularize", type=float, default=2, help="path-length weight (default 2: official code)")
    parser.add_argument("--path-batch-shrink", type=int, default=2, help="path-length batch divisor (default 2: official code)")
    parser.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (default 16: official code)")
    parser.add_argument("--g-reg-every", type=int, default=4, help="lazy path-length interval (default 4: official code)")
    parser.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability on non-anchor iterations (default 0.9: official code)")
    parser.add_argument("--cdc-export", action="store_true",
                        help="also write <out>/g_ema_cdc_generate.pt with DataParallel's module. prefix, the form the official generate.py's --ckpt_target expects")
    parser.add_argument("--ignore-source-optim", action="store_true",
                        help="start Adam from zero moments instead of the source run's g_optim/d_optim (official: loaded when present)")
    args = runtime.parse_args_or_demo(parser, argv, "cdc", **runtime.DEMO_SCHEDULE)
    runtime.check_common_args(args)
    runtime.check_discriminator_batch(args.batch)
    if args.feat_const_batch < 3:
        raise UserError("--feat-const-batch must be at least 3 (each row needs two other samples to form a distribution)")
    if args.subspace_freq < 1 or not 1 <= args.highp <= 4:
        raise UserError("--subspace-freq must be >= 1 and --highp in 1..4")
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD: the cross-domain distance consistency loss


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


def distance_consistency_loss(feats_src, feats_tgt, layer_idx, direction="source_target", reduction="mean"):
    """CDC's L_dist without the lambda weight.

    feats_src / feats_tgt: lists of per-layer tensors [N, C, H, W] of G_s and G_{s->t} for the same z;
    layer_idx: int tensor [N], the layer used for anchor row i. Official value (defaults):
        mean over the N(N-1) entries of P_s (log P_s - log P_t)   (= nn.KLDivLoss()(log P_t, P_s))
    direction "target_source" gives KL(P_t || P_s) (paper); reduction "batchmean" divides the sum by N,
    "sum" does not divide. Gradients reach only the adapted side.
    """
    log_p_src = pairwise_similarity_logprobs([f.detach() for f in feats_src], layer_idx)  # [N, N-1]
    log_p_tgt = pairwise_similarity_logprobs(feats_tgt, layer_idx)  # [N, N-1]
    if direction == "source_target":
        # KL(P_s || P_t) entries: P_s (log P_s - log P_t)
        entries = log_p_src.exp() * (log_p_src - log_p_tgt)
    else:
        # KL(P_t || P_s) entries: P_t (log P_t - log P_s)
        entries = log_p_tgt.exp() * (log_p_tgt - log_p_src)
    if reduction == "mean":
        return entries.mean()
    if reduction == "batchmean":
        return entries.sum() / entries.shape[0]
    return entries.sum()


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    device = runtime.init_device(args.device, args.precision)
    runtime.seed_everything(args.seed)

    # SHARED: source checkpoint, target images, run folder
    models, source_ckpt = load_checkpoint(args.source, require=("g", "g_ema", "d"), device=device)
    g_source, g_ema, discriminator = models["g"], models["g_ema"], models["d"]  # G_s = the source's non-EMA g
    generator = copy.deepcopy(g_source).train()  # G_{s->t}, initialised from G_s
    g_source_ema = copy.deepcopy(g_ema)  # only for the source half of the sample grids
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
    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # METHOD: anchor iteration (image-level D, z from the anchor regions) or patch iteration (z ~ p_z)
        anchor_iter = args.adv == "both" and common.is_anchor_iteration(i, args.subspace_freq)
        patch_level = args.adv == "patch" or (args.adv == "both" and not anchor_iter)

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

        # METHOD: cross-domain distance consistency on a fresh batch z ~ N(0, I)
        dist_loss = torch.zeros((), device=device)
        if not args.no_dist:
            z = torch.randn(args.feat_const_batch, latent_dim, device=device)  # [N, D]
            noise_src = noise_tgt = None
            if args.same_noise:
                noise_src = noise_tgt = common.per_sample_noise(generator, args.feat_const_batch, device)
            # one layer per anchor row, uniform in {1, ..., n_latent - 2}
            layer_idx = torch.randint(1, n_latent - 1, (args.feat_const_batch,))  # [N], on the CPU: no device sync
            # both generators stop at the deepest layer used (the official code also renders the image)
            deepest = int(layer_idx.max()) if args.kl_layers == "random" else n_latent - 2
            with torch.no_grad():
                _, feats_src = runtime.generate_rows(g_source, [z], noise=noise_src, return_feats=True, feats_upto=deepest)
            _, feats_tgt = runtime.generate_rows(generator, [z], noise=noise_tgt, return_feats=True, feats_upto=deepest)
            # L_dist couples the N latents: every process's rows gathered (autograd flows back to each), so every
            # process computes the single-process loss of all N (runtime.py,
            # 'Several processes'; in one process gather returns its input)
            feats_src, feats_tgt = runtime.gather(feats_src, args.feat_const_batch), runtime.gather(feats_tgt, args.feat_const_batch)
            if args.kl_layers == "random":
                dist_loss = distance_consistency_loss(feats_src, feats_tgt, layer_idx, args.kl_direction, args.kl_reduction)
            else:
                # sum over the layers l = 1 .. n_latent - 2
                dist_loss = sum(
                    distance_consistency_loss(feats_src, feats_tgt, torch.full((args.feat_const_batch,), layer),
                                              args.kl_direction, args.kl_reduction)
                    for layer in range(1, n_latent - 1)
                )
            # L_G + lambda L_dist
            g_terms.backward(args.kl_wt * dist_loss)
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

        # SHARED: EMA; the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        common.accumulate(g_ema, generator, common.EMA_DECAY)
        run.end_iteration(i, {"d": d_loss, "g": g_loss, "dist": dist_loss, "r1": r1_loss, "path": path_loss,
                              "mean_path": mean_path_length})
    path = run.finish()  # the last sample grids and checkpoint
    if args.cdc_export:
        runtime.save_checkpoint(os.path.join(run.root, "g_ema_cdc_generate.pt"),
                               {"g_ema": {"module." + k: v for k, v in g_ema.state_dict().items()}})
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
