"""StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image Generators (Gal et al., SIGGRAPH 2022), the baseline of DiFa's paper.

`python nada.py ...` is `python difa.py --baseline nada ...`: the same options (difa.py's parser), defaults, run
folder (runs/difa-<target>) and files; either file resumes the run. This file holds what only NADA does: its
image direction, the adaptive layer selection and the training loop; the directional CLIP loss, the text
direction, the prompts and the shared start-up are difa.py's. As rinongal/StyleGAN-nada:
    L = sum_m c_m lambda_dir L_global,m    (no L_local, no L_scc, no e4e), d_m from the text prompts (difa.py),
      or from images: d_m = normalize(mean_r E_m(I_r) - mean_j E_m(G_A(z_j))), j < img2img_batch (unit
      embeddings, neither mean re-normalised: NADA's compute_img2img_direction)
  Adaptive layer selection, every iteration (NADA's determine_opt_layers):
    w+_0 = G_A.mapping(z) repeated over the L W+ layers, z: auto_layer_batch fresh samples
    w+   = auto_layer_iters steps of SGD (lr 0.01) on L_sel(w+) = sum_m c_m mean_b 1 - cos(E_m(G_B(w+)), t_m)
           (t_m: unit embedding of the raw target text, no template, as NADA; for an image target the
            re-normalised mean reference embedding, as DiFa's release's global_clip_loss with a target image.
            Declared difference: NADA's own code aims the selection at the --target_class text even with
            image references, "cat" by default when its README's image command leaves that flag out; no
            effect at the default k = all layers, where every layer trains whatever the selection says)
    train only the auto_layer_k layers of largest mean_{b,d} |w+ - w+_0|, W+ index l -> NADA's list
    [conv1, to_rgb1, convs[0], convs[1], ...] (which is one off from the layer that reads w+_l; kept);
    the other layers get zero gradients (torch 1.7's zero_grad, as in the release: with Adam's beta1 = 0
    they do not move, their second moments decay). --auto-layer-iters 0: no selection, DiFa's trained set.
Defaults: NADA's README command (batch 2, 301 iterations, lr 0.002, ViT-B/32 + ViT-B/16, --auto_layer_iters 1,
--auto_layer_batch 8, a checkpoint every 150) and its code (img2img batch 16, samples at truncation 0.7:
train_options); difa.parse_args picks them with --baseline nada.
"""

import sys

import torch
import torch.nn.functional as F

import common
import difa
import runtime
from common import UserError
from difa import clip_source_mean, global_clip_loss, prompt_embeddings, trainable_generator_parameters
from pretrained import clip_input

AUTO_LAYER_LR = 0.01  # SGD step of NADA's W+ optimisation in determine_opt_layers (hard-coded there)
OPTIONS = ("auto_layer_k", "auto_layer_iters", "auto_layer_batch", "img2img_batch")  # refused without --baseline nada


def add_arguments(parser):
    """NADA's options, on difa.py's parser: adaptive layer selection and the image direction's source mean."""
    parser.add_argument("--auto-layer-k", type=int, default=None,
                        help="k, W+ layers trained each iteration (default: all L of the generator, as NADA README's --auto_layer_k 18 "
                             "for its 1024 px generator, L = 18)")
    parser.add_argument("--auto-layer-iters", type=int, default=1,
                        help="SGD steps of the W+ optimisation that ranks the layers (default 1: NADA README and code; 0: no selection, "
                             "input, conv1 and convs train, NADA's phase None)")
    parser.add_argument("--auto-layer-batch", type=int, default=8, help="W+ codes of that optimisation (default 8: NADA README and code)")
    parser.add_argument("--img2img-batch", type=int, default=16,
                        help="G_A samples whose mean CLIP embedding is the source of an image target's direction (default 16: NADA code)")


def check_args(args):
    if args.auto_layer_k is not None and args.auto_layer_k < 1:
        raise UserError(f"--auto-layer-k must be at least 1, got {args.auto_layer_k}")
    if args.auto_layer_iters < 0 or args.auto_layer_batch < 1 or args.img2img_batch < 1:
        raise UserError("--auto-layer-iters must be >= 0; --auto-layer-batch and --img2img-batch >= 1")


# ------------------------------------------------------------------------------------------------
# METHOD: the image direction and the layer selection (pure functions)


def nada_image_direction(ref_emb, source_emb):
    """d = normalize(mean_r normalize(e_r) - mean_j e_j), NADA's compute_img2img_direction: ref_emb [n, D] raw reference
    embeddings, source_emb [D] the mean unit embedding of img2img_batch G_A samples -> [D]. Unlike
    reference_direction (DiFa's release) the mean reference is not re-normalised; the same for one reference."""
    # d = normalize(mean_r e_r / |e_r| - mu_16)
    return F.normalize(F.normalize(ref_emb, dim=-1).mean(0) - source_emb, dim=-1, eps=1e-8)  # [D]


def clip_similarity_loss(emb, target):
    """NADA's global_clip_loss, 1 - logits / 100 = mean_b 1 - cos(E(x_b), t) (OpenAI's logit scale is 100);
    emb [B, D] unit image embeddings, target [D] a unit text (or reference) embedding."""
    # L_sel = mean_b 1 - <E(x_b), t>
    return (1 - emb @ target).mean()


def layer_movement(w_init, w_moved):
    """m_l = mean_{b,d} |w+_bld - w+_0,bld|, NADA's layer_weights; W+ codes [B, L, D] -> [L]."""
    # m_l = mean_b mean_d |w+ - w+_0|
    return (w_moved - w_init).abs().mean(-1).mean(0)  # [L]


def optimise_wplus(w_init, loss_fn, steps, lr):
    """`steps` of plain SGD (NADA: torch.optim.SGD, lr 0.01, no momentum) on a copy of the W+ codes w_init [B, L, D]
    against loss_fn(w+) -> (w+ [B, L, D] detached, the last loss value or None). Gradients reach w+ only."""
    w = w_init.detach().clone().requires_grad_(True)
    loss = None
    for _ in range(steps):
        loss = loss_fn(w)
        (grad,) = torch.autograd.grad(loss, [w])
        with torch.no_grad():
            # w+ <- w+ - lr dL_sel/dw+
            w.sub_(lr * grad)
    return w.detach(), None if loss is None else loss.detach()


def select_layers(w_init, loss_fn, steps, lr, k):
    """NADA's determine_opt_layers on given codes: the indices of the k W+ layers that move most under the W+
    optimisation, largest first, and its last loss."""
    w_moved, loss = optimise_wplus(w_init, loss_fn, steps, lr)
    return torch.topk(layer_movement(w_init, w_moved), k).indices.tolist(), loss


def nada_layers(g):
    """NADA's idx_to_layer: W+ index l -> module, [conv1, to_rgb1, convs[0], ..., convs[-1]] (L entries)."""
    return [g.conv1, g.to_rgb1, *g.convs]


# ------------------------------------------------------------------------------------------------
# Training


def train(args):
    """NADA's run on options from difa.parse_args (--baseline nada); difa.main comes here."""
    device, g_source, generator, source_ckpt = difa.load_generators(args)
    latent_dim, n_latent = generator.style_dim, generator.n_latent
    text, select = args.target_text is not None, args.auto_layer_iters > 0  # select: NADA's adaptive layer selection
    # METHOD: the candidate layers, chosen anew each iteration (--auto-layer-iters 0: DiFa's trained set, NADA's phase None)
    layers = nada_layers(generator)
    params = [p for layer in layers for p in layer.parameters()] if select else trainable_generator_parameters(generator)
    for p in params:
        p.requires_grad_(True)
    k_layers = n_latent if args.auto_layer_k is None else args.auto_layer_k
    if select and k_layers > n_latent:
        raise UserError(f"--auto-layer-k {k_layers} exceeds the generator's {n_latent} W+ layers")
    run = runtime.Run(args, __file__)  # the run folder, --resume, log, sample grids, checkpoints, Ctrl-C

    # METHOD: CLIP towers, a text's directions d_m; the selection targets t_m: the unit embedding of the raw text
    # (or of --prompt-template's), or the release's target_image normalize(mean_r normalize(e_r)), each [D]
    antialias = not args.no_antialias
    towers, ref_emb, _, directions, text_towers = difa.load_clip(args, device, False)
    if text:
        targets = [prompt_embeddings(t, args.target_text, args.clip_vocab, (args.prompt_template or "{}",))[0] for t in text_towers]
    else:
        targets = [F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1) for emb in ref_emb]
    del text_towers

    # SHARED: optimiser, sample latents, --resume (the checkpoint keeps DiFa's layout, its SCC queues empty)
    runtime.autocast_forwards(args.precision, g_source, generator)
    g_optim = common.make_adam(params, args.lr, args.g_reg_every)
    queues = difa.CodeQueues(args.sliding_window_size)
    _, sample_z, mean_latent = difa.start(args, run, g_source, generator, g_optim, queues, device)
    if not text:  # d_m = normalize(mean_r normalize(e_r) - mean_j E_m(G_A(z_j))), j < img2img_batch
        directions = [nada_image_direction(e, clip_source_mean(g_source, t, args.img2img_batch, args.clip_mean_batch, antialias, args.seed + 1))
                      for e, t in zip(ref_emb, towers)]
    write_samples = difa.sample_writer(args, run, g_source, generator, sample_z, mean_latent)

    def checkpoint(i_next):
        return difa.checkpoint_state(args, source_ckpt, generator, g_optim, i_next, queues, sample_z, mean_latent)

    def selection_loss(w_plus):
        """L_sel(w+) = sum_m c_m mean_b 1 - cos(E_m(G_B(w+)), t_m), w+ [B, L, D] (random noise, truncation 1)."""
        x, _ = generator([w_plus], input_is_latent=True)
        return sum(c * clip_similarity_loss(F.normalize(t(clip_input(x, t.resolution, antialias))[0], dim=-1), target)
                   for t, c, target in zip(towers, args.clip_model_weights, targets))

    for i in run.iterations(checkpoint, write_samples):  # start .. --iter - 1, under a progress bar
        z = torch.randn(args.batch, latent_dim, device=device)  # drawn before the selection codes, as NADA's train.py
        losses = {}
        if select:
            # METHOD: the layer selection on fresh codes w+_0 [B_sel, L, D], then only those layers train
            with torch.no_grad():
                w_init = g_source.get_latent(torch.randn(args.auto_layer_batch, latent_dim, device=device))
            w_init = w_init.unsqueeze(1).repeat(1, n_latent, 1)  # [B_sel, L, D]
            chosen, select_loss = select_layers(w_init, selection_loss, args.auto_layer_iters, AUTO_LAYER_LR, k_layers)
            for index, layer in enumerate(layers):
                layer.requires_grad_(index in chosen)
            losses["select"] = select_loss.item()
        # METHOD: one w per sample, the same w for both generators, independent noise; the directional CLIP loss
        with torch.no_grad():
            w = g_source.get_latent(z)  # [B, D]
            x_a, _ = runtime.generate_rows(g_source, [w], input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        x_b, _ = runtime.generate_rows(generator, [w], input_is_latent=True)  # [B, 3, H, W]: G(z) (torchrun: this process's rows)
        global_loss, loss = torch.zeros((), device=device), torch.zeros((), device=device)
        for tower, weight, direction in zip(towers, args.clip_model_weights, directions):
            with torch.no_grad():
                emb_a = F.normalize(tower(clip_input(x_a, tower.resolution, antialias))[0], dim=-1)
            g_m = global_clip_loss(F.normalize(tower(clip_input(x_b, tower.resolution, antialias))[0], dim=-1), emb_a, direction)
            loss = loss + weight * args.lambda_direction * g_m
            global_loss = global_loss + weight * g_m.detach()
        g_optim.zero_grad(set_to_none=True)
        loss.backward()
        if select:
            for p in params:  # layers not chosen: zero gradients, no update (Adam's beta1 = 0), as the release
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        g_optim.step()

        # SHARED: the losses to log.csv and the progress bar; sample grids, checkpoints; Ctrl-C: save and stop
        run.end_iteration(i, {"loss": loss.item(), "global": global_loss.item(), **losses})
    path = run.finish()  # the last sample grids and checkpoint
    print(f"done: {path}")
    return path


def main(argv=None):
    """`python nada.py ARGS` = `python difa.py --baseline nada ARGS`."""
    return difa.main(["--baseline", "nada", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    runtime.run_main(main)
