"""Pretrain the demo's source StyleGAN2 on procedural toy faces (demo/toyfaces.py).

    python -m demo.pretrain_source                      # writes demo/source.pt (what the repository ships)
    python -m demo.pretrain_source --out runs/toy-source --resume

StyleGAN2 as in rosinality's train.py (non-saturating logistic loss, lazy R1 every 16 D steps, style
mixing 0.9, EMA generator with rosinality's decay, Adam with lazy-regularisation scaling), at 32 px with
every layer capped at 64 channels, style dim 128 and 8 mapping layers, on a fixed set of rendered faces
(seeds 0 .. n_train-1). Path-length regularisation is off (pl_weight 0) and gamma is small, as
StyleGAN2-ADA's configuration for 32-px data suggests; both are our choices for a 2-core CPU budget.
The result is a normal rosinality-format checkpoint (g, g_ema, d, g_optim, d_optim, args) that every
method file loads like an FFHQ one.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    EMA_DECAY, UserError, accumulate, d_logistic_loss, d_r1_loss, g_nonsaturating_loss, make_adam, mixing_noise, requires_grad,
)
from runtime import (  # noqa: E402
    format_losses, get_rng_state, image_grid, progress_bar, resolve_device, run_main, save_checkpoint, save_png, seed_everything,
    set_rng_state,
)
from demo import toyfaces  # noqa: E402
from checkpoints import read_checkpoint  # noqa: E402
from stylegan2 import Discriminator, Generator  # noqa: E402

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(DEMO_DIR, "source.pt"), help="final checkpoint path")
    p.add_argument("--work-dir", default=os.path.join("runs", "toy-source"), help="periodic checkpoints and sample grids")
    p.add_argument("--size", type=int, default=32, help="image resolution (our choice: the demo's 32 px, fast on a 2-core CPU)")
    p.add_argument("--channel-cap", type=int, default=64, help="at most this many channels in any layer (our choice: fits the 20 MB checkpoint budget)")
    p.add_argument("--style-dim", type=int, default=128, help="z / w dimension (our choice; rosinality: 512)")
    p.add_argument("--n-mlp", type=int, default=8, help="mapping network depth (rosinality default)")
    p.add_argument("--iter", type=int, default=10000, help="training iterations (our choice: about 50 min on one CPU core)")
    p.add_argument("--batch", type=int, default=8, help="batch size (our choice; rosinality: 16)")
    p.add_argument("--lr", type=float, default=0.002, help="Adam learning rate (rosinality default)")
    p.add_argument("--r1", type=float, default=0.05, help="R1 gamma (StyleGAN2-ADA's rule 0.0002 res^2 / batch, rounded)")
    p.add_argument("--d-reg-every", type=int, default=16, help="lazy R1 interval (rosinality default)")
    p.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability (rosinality default)")
    p.add_argument("--n-train", type=int, default=20000, help="rendered training faces, seeds 0 .. n-1 (our choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch, numpy and random (our choice)")
    p.add_argument("--save-every", type=int, default=1000, help="iterations between checkpoints and sample grids in --work-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's latest checkpoint")
    return p.parse_args(argv)


def render_training_set(n, size):
    """All training faces as uint8 [n, 3, size, size] (rendered once; about 1.5 ms per face)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        faces = list(pool.map(lambda s: toyfaces.render_seed(s, "source", size), range(n)))
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()  # [n, 3, H, W]


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    g = Generator(args.size, args.style_dim, args.n_mlp, channel_cap=args.channel_cap).to(device)
    g_ema = Generator(args.size, args.style_dim, args.n_mlp, channel_cap=args.channel_cap).to(device).eval()
    d = Discriminator(args.size, channel_cap=args.channel_cap).to(device)
    accumulate(g_ema, g, 0)
    g_optim = make_adam(g.parameters(), args.lr, 0)
    d_optim = make_adam(d.parameters(), args.lr, args.d_reg_every)
    os.makedirs(os.path.join(args.work_dir, "samples"), exist_ok=True)
    latest = os.path.join(args.work_dir, "latest.pt")
    start = 0
    if args.resume:
        if not os.path.exists(latest):
            raise UserError(f"--resume: no checkpoint at {latest}")
        saved = read_checkpoint(latest)
        for name, module in (("g", g), ("g_ema", g_ema), ("d", d), ("g_optim", g_optim), ("d_optim", d_optim)):
            module.load_state_dict(saved[name])
        set_rng_state(saved["rng"])
        start = saved["iter"]
    print(f"rendering {args.n_train} training faces at {args.size} px", file=sys.stderr)
    faces = render_training_set(args.n_train, args.size)  # [N, 3, H, W] uint8
    sample_z = torch.randn(64, args.style_dim, generator=torch.Generator().manual_seed(1234)).to(device)

    def state(i):
        return {"g": g.state_dict(), "g_ema": g_ema.state_dict(), "d": d.state_dict(),
                "g_optim": g_optim.state_dict(), "d_optim": d_optim.state_dict(),
                "args": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "resume", "device")},
                "iter": i, "rng": get_rng_state()}

    started = time.time()
    bar = progress_bar(start, args.iter)
    for i in bar:
        real = faces[torch.randint(0, len(faces), (args.batch,))].to(device).float() / 127.5 - 1  # [B, 3, H, W]

        requires_grad(g, False)
        requires_grad(d, True)
        fake, _ = g(mixing_noise(args.batch, args.style_dim, args.mixing, device))  # [B, 3, H, W]
        d_loss = d_logistic_loss(d(real), d(fake))
        d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()
        losses = {"d": d_loss}
        if i % args.d_reg_every == 0:
            real.requires_grad_(True)
            r1 = d_r1_loss(d(real), real)
            d.zero_grad(set_to_none=True)
            (args.r1 / 2 * r1 * args.d_reg_every).backward()
            d_optim.step()
            losses["r1"] = r1

        requires_grad(g, True)
        requires_grad(d, False)
        fake, _ = g(mixing_noise(args.batch, args.style_dim, args.mixing, device))  # [B, 3, H, W]
        g_loss = g_nonsaturating_loss(d(fake))
        g.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optim.step()
        accumulate(g_ema, g, EMA_DECAY)
        losses["g"] = g_loss
        bar.set_postfix_str(format_losses(losses))

        if (i + 1) % args.save_every == 0 or i + 1 == args.iter:
            with torch.no_grad():
                samples, _ = g_ema([sample_z], randomize_noise=False)  # [64, 3, H, W]
            save_png(os.path.join(args.work_dir, "samples", f"{i + 1:06d}.png"), image_grid(samples, 8))
            save_checkpoint(latest, state(i + 1))
    save_checkpoint(args.out, state(args.iter))
    print(f"wrote {args.out} ({args.iter - start} iterations in {time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
