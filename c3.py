"""C3: Contrastive Learning for Cross-domain Correspondence in Few-shot Image Generation (Lee et al., NeurIPS 2021
workshop CtrlGen).

Adapts a source StyleGAN2 G_s to ~10 target images. The adapted G_t starts from G_s; for a batch of latents, the
features of G_s(z) must be closer to those of G_t(z) than to those of G_t(z') for the other z' of the batch (an
InfoNCE loss: the same-z pair is the positive, the other z of the batch are the negatives), while a patch-level
discriminator lets the images be realistic only locally.

Objective (paper; no official code, no stated encoder or hyperparameters):
    L_con(G, G_s) = - 1/M sum_i log( exp(cos(f(G_s(z_i)), f(G(z_i))) / tau)
                                     / sum_{j=1..M} exp(cos(f(G_s(z_i)), f(G(z_j))) / tau) )
    L_adv(G, D_patch) = E_{x~D_t}[log D_patch(x)] + E_{z~p_z}[log(1 - D_patch(G(z)))]
    G* = argmin_G max_{D_patch}  L_adv(G, D_patch) + lambda_con L_con(G, G_s)

Our choices (the paper does not state them; each is a flag):
  - f (--encoder generator, default): G's own synthesis-layer activations, flattened, one layer per iteration
    uniform in {1, ..., n_latent - 2} (CDC's layer draw), G_s under no_grad; both generators stop at that layer.
    L_con is written as a function of (G, G_s) only, outside the max over D, and C3 builds on CDC, which compares
    exactly these features. --encoder discriminator uses D's patch map instead (the map feeding the patch head,
    D frozen in the G step), mean-pooled or flattened (--d-pool).
  - tau = 0.07 (CUT / MoCo), lambda_con = 1 (InfoNCE is O(log M), unlike CDC's tiny KL that needs 1000),
    M = 4 (CDC's feat_const_batch), one direction only (source anchor), as the paper's formula.
  - Everything else is CDC's official code: 5002 iterations, batch 4, lr 0.002, CDC's patch head on D's 32x32 map
    (with D's trunk fine-tuned), R1 10 every 16 on the per-image mean of the patch logits, path length 2 every 4,
    style mixing 0.9, EMA, `ckpt["g"]` as G_s and the start of G_t, the source's Adam moments.

Differs from cdc.py (the loop both files share):
  - L_con (InfoNCE over source-vs-adapted pairs, M x M cosine matrix) replaces L_dist (KL between the two
    generators' within-domain similarity distributions),
  - patch-level D on every iteration: no anchors, no image-level D, no anchor sample grid,
  - a single feature layer per iteration for the whole batch (CDC draws one per anchor row).
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

OURS = "unstated in the paper: our choice"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="C3 few-shot adaptation (Lee et al., NeurIPS 2021 workshop)")
    runtime.add_common_args(parser, origin=f"{OURS}, CDC's official code")
    # METHOD: contrastive cross-domain correspondence
    parser.add_argument("--con-wt", type=float, default=1.0,
                        help=f"lambda_con, weight of L_con (default 1: {OURS}; InfoNCE is O(log M), CDC's KL needs 1000)")
    parser.add_argument("--con-batch", type=int, default=4,
                        help=f"M latents per L_con batch, M - 1 negatives per anchor (default 4: {OURS}, CDC's feat_const_batch)")
    parser.add_argument("--tau", type=float, default=0.07, help=f"tau, InfoNCE temperature (default 0.07: {OURS}, CUT / MoCo)")
    parser.add_argument("--encoder", choices=["generator", "discriminator"], default="generator",
                        help=f"f: generator: G's features at one synthesis layer per iteration in {{1..n_latent-2}}, as CDC (default, {OURS}); "
                             "discriminator: D's patch map of the image, D frozen for L_con")
    parser.add_argument("--d-pool", choices=["flatten", "mean"], default="flatten",
                        help=f"--encoder discriminator: flatten the map (default, {OURS}: keeps the spatial layout) or average it over positions")
    parser.add_argument("--same-noise", action="store_true",
                        help="give G_s and G_t the same per-pixel noise in L_con (CDC's code: independent noise; default off)")
    parser.add_argument("--no-con", action="store_true", help="ablation: drop L_con (fine-tuning with the patch D only)")
    # METHOD: patch discriminator (CDC's head, on every iteration)
    parser.add_argument("--highp", type=int, default=1, help="patch map drawn from the first k of CDC's 4 maps (default 1: the 32x32 map, CDC's official code)")
    # SHARED: StyleGAN2 regularisers, as rosinality / CDC's official code (unstated in the paper)
    parser.add_argument("--r1", type=float, default=10, help="R1 weight gamma (default 10: CDC's official code)")
    parser.add_argument("--path-regularize", type=float, default=2, help="path-length weight (default 2: CDC's official code)")
    parser.add_argument("--path-batch-shrink", type=int, default=2, help="path-length batch divisor (default 2: CDC's official code)")
    parser.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (default 16: CDC's official code)")
    parser.add_argument("--g-reg-every", type=int, default=4, help="lazy path-length interval (default 4: CDC's official code)")
    parser.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability (default 0.9: CDC's official code)")
    parser.add_argument("--cdc-export", action="store_true",
                        help="also write <out>/g_ema_cdc_generate.pt with DataParallel's module. prefix, the form CDC's official generate.py's --ckpt_target expects")
    parser.add_argument("--ignore-source-optim", action="store_true",
                        help="start Adam from zero moments instead of the source run's g_optim/d_optim (CDC's code: loaded when present)")
    args = runtime.parse_args_or_demo(parser, argv, "c3", **runtime.DEMO_SCHEDULE)
    runtime.check_common_args(args)
    runtime.check_discriminator_batch(args.batch)
    if args.con_batch < 2:
        raise UserError("--con-batch must be at least 2 (each anchor needs one negative)")
    if args.tau <= 0 or not 1 <= args.highp <= 4:
        raise UserError("--tau must be positive and --highp in 1..4")
    return runtime.finish_args(args)


# ------------------------------------------------------------------------------------------------
# METHOD: the contrastive cross-domain correspondence loss


def contrastive_correspondence_loss(feat_src, feat_tgt, tau):
    """C3's L_con without the lambda_con weight: InfoNCE with anchor f(G_s(z_i)), positive f(G_t(z_i)) and
    negatives f(G_t(z_j)), j != i.

    feat_src / feat_tgt: [M, D] features of G_s and G_t for the same z (row i <-> z_i). Returns
        - 1/M sum_i log( exp(cos(src_i, tgt_i) / tau) / sum_j exp(cos(src_i, tgt_j) / tau) ),
    i.e. the cross-entropy with target i over row i of the cosine matrix / tau. Gradients reach only the
    adapted side.
    """
    # src_i / |src_i|, tgt_j / |tgt_j|
    src = F.normalize(feat_src.detach(), dim=1)  # [M, D]
    tgt = F.normalize(feat_tgt, dim=1)  # [M, D]
    # s_ij = cos(src_i, tgt_j) / tau
    logits = src @ tgt.t() / tau  # [M, M]
    # - 1/M sum_i log softmax_j(s_ij)[j = i]
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
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

    # METHOD: CDC's patch head and which D map each patch level reads
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

    sample_z = torch.randn(args.n_sample, latent_dim, device=device)  # [S, D]
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
        sample_z = state["sample_z"].to(device)
        mean_path_length = state["mean_path_length"].to(device)
        sampler.load_state_dict(state["sampler"])

    # SHARED: the source half of the sample grids (the source's g_ema), one fixed noise for both halves
    fixed_noise = [getattr(g_source_ema.noises, f"noise_{k}") for k in range(g_source_ema.num_layers)]
    with torch.no_grad():
        source_samples = g_source_ema([sample_z], noise=fixed_noise)[0].cpu()
    del g_source_ema

    def checkpoint(i_next):
        return runtime.training_state(
            i_next, args, generator, g_ema, discriminator, g_optim, d_optim,
            patch_head=head.state_dict(), patch_optim=e_optim.state_dict(), sample_z=sample_z,
            mean_path_length=mean_path_length, sampler=sampler.state_dict(),
        )

    def write_samples(i):
        with torch.no_grad():
            adapted = g_ema([sample_z], noise=fixed_noise)[0]
        runtime.save_comparison_grid(run.sample_path(i), source_samples, adapted)

    # METHOD: the patch-level D (a fresh patch map per D call, as CDC's code) and the encoder f
    def d_logits(images):
        level = int(torch.randint(0, args.highp, ()))
        return common.patch_logits(discriminator, head, images, level, patch_maps)  # [B, 1, h, w]

    def encode(g, z, noise, index):
        """f(G(z)) as rows [M, D']: G's synthesis feature `index`, or D's patch map `index` of the image G(z) (this
        process's rows of the M under torchrun)."""
        if args.encoder == "generator":
            _, feats = runtime.generate_rows(g, [z], noise=noise, return_feats=True, feats_upto=index)  # G stops after feats[index]
            return feats[index].flatten(1)  # [M, C*h*w]
        image, _ = runtime.generate_rows(g, [z], noise=noise)  # [M, 3, H, W]
        feature = discriminator.feature_maps(image, stop_after=patch_maps[index])[-1]  # [M, C, h, w]
        return feature.mean((2, 3)) if args.d_pool == "mean" else feature.flatten(1)  # [M, C] or [M, C*h*w]

    n_latent = generator.n_latent
    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        # SHARED: D step
        real_img = next(sampler)  # [B, 3, H, W] (torchrun: this process's B/N rows)
        common.requires_grad(generator, False)
        common.requires_grad(discriminator, True)
        common.requires_grad(head, True)
        with torch.no_grad():
            fake_img, _ = runtime.generate_rows(generator, common.mixing_noise(args.batch, latent_dim, args.mixing, device))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
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
        fake_img, _ = runtime.generate_rows(generator, common.mixing_noise(args.batch, latent_dim, args.mixing, device))  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        g_loss = common.g_nonsaturating_loss(d_logits(fake_img))
        g_terms.backward(g_loss)

        # METHOD: contrastive cross-domain correspondence on a fresh batch z ~ N(0, I)
        con_loss = torch.zeros((), device=device)
        if not args.no_con:
            z = torch.randn(args.con_batch, latent_dim, device=device)  # [M, D]
            noise_src = noise_tgt = None
            if args.same_noise:
                noise_src = noise_tgt = common.per_sample_noise(generator, args.con_batch, device)
            # f's layer, one per iteration: a G layer uniform in {1, ..., n_latent - 2}, or one of the first highp patch maps
            low, high = (1, n_latent - 1) if args.encoder == "generator" else (0, args.highp)
            index = int(torch.randint(low, high, ()))  # on the CPU: no device sync
            with torch.no_grad():
                feat_src = encode(g_source, z, noise_src, index)  # [M, D']
            feat_tgt = encode(generator, z, noise_tgt, index)  # [M, D']
            # InfoNCE couples the M latents: every process's rows gathered (autograd flows back to each), so every
            # process computes the single-process loss of all M (runtime.py,
            # 'Several processes'; in one process gather returns its input)
            feat_src, feat_tgt = runtime.gather(feat_src, args.con_batch), runtime.gather(feat_tgt, args.con_batch)
            con_loss = contrastive_correspondence_loss(feat_src, feat_tgt, args.tau)
            # L_G + lambda_con L_con
            g_terms.backward(args.con_wt * con_loss)
        g_terms.finish()
        g_optim.step()

        # SHARED: lazy path-length regularisation (z ~ p_z with mixing)
        path_loss = torch.zeros((), device=device)
        if i % args.g_reg_every == 0:
            path_batch = max(1, args.batch // args.path_batch_shrink)
            fake_img, latents = runtime.generate_rows(generator, common.mixing_noise(path_batch, latent_dim, args.mixing, device), return_latents=True)
            path_loss, mean_path_length, _ = common.g_path_regularize(fake_img, latents, mean_path_length, batch=path_batch)
            generator.zero_grad()
            (args.path_regularize * args.g_reg_every * path_loss).backward()
            g_optim.step()

        # SHARED: EMA, the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        common.accumulate(g_ema, generator, common.EMA_DECAY)
        run.end_iteration(i, {"d": d_loss, "g": g_loss, "con": con_loss, "r1": r1_loss, "path": path_loss,
                              "mean_path": mean_path_length})
    path = run.finish()  # the last sample grids and checkpoint
    if args.cdc_export:
        runtime.save_checkpoint(os.path.join(run.root, "g_ema_cdc_generate.pt"),
                               {"g_ema": {"module." + k: v for k, v in g_ema.state_dict().items()}})
    print(f"done: {path}")
    return path


if __name__ == "__main__":
    runtime.run_main(main)
