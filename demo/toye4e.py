"""The toy e4e: a small Encoder4Editing that inverts the demo's source generator, the demo's stand-in for
e4e_ffhq_encode.pt (DiFa's selective cross-domain consistency reads images through it).

    python -m demo.toye4e        # writes demo/toye4e.pt (what the repository ships)

What it is: pretrained.E4E (IR-SE body, FPN, map2style heads; w+ = w0 + [0, delta_1 ..] + latent_avg) with
the IR-SE stage widths 16, 32, 48, 64 and one unit per stage in place of IR-SE50's 64 .. 512 and 3, 4, 14, 3,
reading 32-px images and writing the source generator's 8 x 128 W+ code. It is saved as e4e's files are:
"state_dict" with encoder.* keys, "latent_avg" [8, 128] (the generator's mean w) and "opts", so
pretrained.load_e4e reads it (its configuration inferred from the shapes by pretrained.e4e_config).

How it is trained: on images the frozen source generator (demo/source.pt, g_ema) draws from known codes,
z ~ N(0, I) -> w = mapping(z) (with probability 1/2 two w's mixed at a random layer, as G_B's training sees
one w per layer) -> x = G(w+) with random noise, then
    L = ||E(x) - w+||^2 (mean over layers and channels) + ||G(E(x)) - x||^2 (mean over pixels; the same noise),
Adam, one-cycle schedule. The command prints the held-out reconstruction MSE of G(E(x)) against G(latent_avg),
the mean-code baseline, on codes and noise it never saw.
"""

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrained  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
TOYE4E_PATH = os.path.join(DEMO_DIR, "toye4e.pt")
SOURCE_PATH = os.path.join(DEMO_DIR, "source.pt")
WIDTHS, UNITS = (16, 32, 48, 64), (1, 1, 1, 1)  # IR-SE stages (our choice; IR-SE50: 64, 128, 256, 512 / 3, 4, 14, 3)
SE_REDUCTION = 8  # squeeze-excitation reduction (our choice, so the 16-channel stage keeps 2 channels; e4e: 16)


def sample_codes(g, batch, mixing):
    """Known W+ codes of the generator: one w per sample, or two mixed at a random layer. [B, n_latent, D]."""
    w = g.get_latent(torch.randn(batch, g.style_dim)).unsqueeze(1).repeat(1, g.n_latent, 1)  # [B, n, D]
    if random.random() < mixing:
        cut = random.randint(1, g.n_latent - 1)
        w[:, cut:] = g.get_latent(torch.randn(batch, g.style_dim)).unsqueeze(1)  # [B, 1, D] broadcast
    return w


def reconstruction_report(encoder, g, n=256, seed=12345):
    """Held-out pixel MSE of G(E(x)) and of the mean code G(latent_avg), and the code MSE |E(x) - w|^2."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = g.get_latent(torch.randn(n, g.style_dim, generator=generator))  # [N, D]
        noise = [torch.randn(1, 1, *buf.shape[-2:], generator=generator) for buf in g.make_noise()]
        x, _ = g([w], input_is_latent=True, noise=noise)  # [N, 3, 32, 32]
        codes = encoder(pretrained.e4e_input(x, encoder.size))  # [N, n_latent, D]
        recon, _ = g([codes], input_is_latent=True, noise=noise)
        mean, _ = g([encoder.latent_avg.expand(n, -1, -1)], input_is_latent=True, noise=noise)
    return {"encoder": F.mse_loss(recon, x).item(), "mean code": F.mse_loss(mean, x).item(),
            "code": F.mse_loss(codes, w.unsqueeze(1).expand_as(codes)).item()}


def train(g, args, log=print):
    encoder = pretrained.E4E(WIDTHS, UNITS, style_dim=g.style_dim, n_styles=g.n_latent, size=g.size, se_reduction=SE_REDUCTION)
    with torch.no_grad():
        encoder.latent_avg.copy_(g.mean_latent(10000).expand(g.n_latent, -1))  # [n, D], e4e's start_from_latent_avg
    encoder.train()
    optim = torch.optim.Adam(encoder.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, args.lr, total_steps=args.steps, pct_start=0.05)
    for step in range(args.steps):
        with torch.no_grad():
            w = sample_codes(g, args.batch, args.mixing)  # [B, n, D]
            noise = g.make_noise()
            x, _ = g([w], input_is_latent=True, noise=noise)  # [B, 3, 32, 32]
        codes = encoder(pretrained.e4e_input(x, encoder.size))  # [B, n, D]
        recon, _ = g([codes], input_is_latent=True, noise=noise)  # [B, 3, 32, 32]
        code_loss, pixel_loss = F.mse_loss(codes, w), F.mse_loss(recon, x)
        loss = code_loss + args.pixel_weight * pixel_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps}: code MSE {code_loss.item():.4f}, pixel MSE {pixel_loss.item():.4f}")
    return encoder.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description="train the demo's toy e4e encoder", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=SOURCE_PATH, help="the generator to invert (its g_ema)")
    p.add_argument("--out", default=TOYE4E_PATH, help="e4e-layout checkpoint")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (our choice: about 10 min on the loaded 2-core CPU)")
    p.add_argument("--batch", type=int, default=16, help="generated images per step (our choice)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, one-cycle schedule (our choice)")
    p.add_argument("--pixel-weight", type=float, default=1.0, help="weight of the pixel MSE next to the code MSE (our choice)")
    p.add_argument("--mixing", type=float, default=0.5, help="probability of a two-w mixed code (our choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and random (our choice)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.time()
    models, _ = load_checkpoint(args.source, require=("g_ema",), device=torch.device("cpu"))
    g = models["g_ema"].eval().requires_grad_(False)
    encoder = train(g, args)
    state_dict = {f"encoder.{k}": v for k, v in encoder.state_dict().items() if k != "latent_avg"}
    torch.save({"state_dict": state_dict, "latent_avg": encoder.latent_avg.clone(),
                "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": g.size, "start_from_latent_avg": True}}, args.out)
    report = reconstruction_report(encoder, g)
    print(f"held-out pixel MSE: encoder {report['encoder']:.4f}, mean code {report['mean code']:.4f}; code MSE {report['code']:.4f}")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
