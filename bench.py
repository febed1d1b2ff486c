"""Speed benchmark of the shared StyleGAN2 (not a test): G forward, G forward+backward, D forward+backward,
one full GAN step (D step + G step, as in rosinality's train.py without the lazy regularisers).

    python bench.py --size 64 --batch 4                      # ours, CPU
    python bench.py --size 256 --batch 4 --device cuda       # ours, GPU
    python bench.py --size 64 --reference /path/to/stylegan2-pytorch   # also rosinality's model.py, same weights
    python bench.py --size 64 --method cdc                   # seconds per training iteration of cdc.py
    python bench.py --size 64 --method rssa --method-args "--invert-steps 2 --lpips-random-backbone"
    python bench.py --size 256 --method cdc --memory         # peak memory of cdc.py's first two iterations, and where
    python bench.py --size 64 --asc-parts                    # the parts of progressive_asc.py's L_asc
    python bench.py --size 256 --method cdc --batch 8 --precision bf16      # bf16 autocast against --precision fp32
    torchrun --nproc_per_node 4 bench.py --size 256 --method cdc --batch 8  # 4 processes, global batch 8

Prints seconds (median of --repeat runs after one warm-up), it/s and peak memory (CUDA: max allocated;
CPU: the process's peak resident set size so far). `--form` times one modulated-conv form instead of "auto".
Under torchrun (--method only) the iteration is the global batch's, timed by rank 0, with every process's peak
memory; its scaling efficiency is (it/s with N processes) / (N x it/s with one), both at the same --batch.
"""

import argparse
import linecache
import os
import resource
import shlex
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

import common
import runtime
import stylegan2


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_bytes(device):
    """What the peak is made of, now: CUDA memory allocated, or the process's resident set (Linux /proc)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakWhere(threading.Thread):
    """Samples the memory in use every `interval` seconds while the main thread runs a method, and remembers the
    main thread's line in `script` (the training loop's line: which phase) at the highest sample. The peak
    itself is read exactly afterwards (peak_memory_mb); sampling only says where it is reached."""

    def __init__(self, device, script, interval=0.002):
        super().__init__(daemon=True)
        self.device, self.script, self.interval = device, os.path.abspath(script), interval
        self.main_id = threading.main_thread().ident
        self.highest, self.where, self.running = 0, "not sampled", True
        self.by_line = {}  # the highest sample at each line of the script

    def run(self):
        while self.running:
            used = current_memory_bytes(self.device)
            frame = sys._current_frames().get(self.main_id)
            while frame is not None and frame.f_code.co_filename != self.script:
                frame = frame.f_back
            if frame is not None:
                line = linecache.getline(self.script, frame.f_lineno).strip()
                where = f"{os.path.basename(self.script)}:{frame.f_lineno} {line[:90]}"
                self.by_line[where] = max(used, self.by_line.get(where, 0))
                if used > self.highest:
                    self.highest, self.where = used, where
            time.sleep(self.interval)

    def top(self, n=3):
        """The n lines with the highest samples, highest first: (line, MB)."""
        return [(where, used / 2**20) for where, used in sorted(self.by_line.items(), key=lambda item: -item[1])[:n]]

    def stop(self):
        self.running = False
        self.join()


def timed(fn, device, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(g, d, args, device):
    latent = g.style_dim if hasattr(g, "style_dim") else 512
    z = torch.randn(args.batch, latent, device=device)
    real = torch.randn(args.batch, 3, args.size, args.size, device=device)
    g_optim = torch.optim.Adam(g.parameters(), lr=0.002, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(d.parameters(), lr=0.002, betas=(0.0, 0.99))

    def g_forward():
        with torch.no_grad():
            g([z])

    def g_forward_backward():
        g.zero_grad(set_to_none=True)
        image, _ = g([z])
        image.square().mean().backward()

    def d_forward_backward():
        d.zero_grad(set_to_none=True)
        d(real).mean().backward()

    def gan_step():
        # D step: G without graph, D on real and fake
        g.requires_grad_(False)
        d.requires_grad_(True)
        with torch.no_grad():
            fake, _ = g([torch.randn_like(z)])
        d_loss = F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()
        d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()
        # G step: non-saturating loss through D
        g.requires_grad_(True)
        d.requires_grad_(False)
        fake, _ = g([torch.randn_like(z)])
        g_loss = F.softplus(-d(fake)).mean()
        g.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optim.step()

    results = {}
    for name, fn in [
        ("G forward", g_forward),
        ("G forward+backward", g_forward_backward),
        ("D forward+backward", d_forward_backward),
        ("GAN step (D+G)", gan_step),
    ]:
        results[name] = timed(fn, device, args.repeat)
    return results


def benchmark_method(args, device):
    """Seconds per training iteration of a method file, on a random source checkpoint and 10 random images.

    Runs the method for 1 and for 1 + repeat iterations (sampling and saving disabled) and divides the
    difference by `repeat`, so start-up (loading, the first sample grid, an inversion) is not counted.
    """
    import argparse as _argparse
    import importlib
    import tempfile

    import numpy as np
    from PIL import Image

    method = importlib.import_module(args.method)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        g = stylegan2.Generator(args.size, channel_multiplier=args.channel_multiplier, channel_cap=args.channel_cap)
        d = stylegan2.Discriminator(args.size, channel_multiplier=args.channel_multiplier, channel_cap=args.channel_cap)
        source = os.path.join(tmp, "source.pt")
        torch.save({"g": g.state_dict(), "g_ema": g.state_dict(), "d": d.state_dict(), "args": _argparse.Namespace()}, source)
        target = os.path.join(tmp, "target")
        os.makedirs(target)
        rng = np.random.default_rng(0)
        for k in range(10):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(os.path.join(target, f"{k}.png"))
        del g, d

        def run(iters, out):
            argv = ["--source", source, "--target", target, "--out", os.path.join(tmp, out), "--iter", str(iters),
                    "--batch", str(args.batch), "--device", device.type, "--precision", args.precision,
                    "--sample-every", "100000", "--save-every", "100000", "--n-sample", "4"]
            argv += shlex.split(args.method_args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            method.main(argv)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        if args.summed_backward:
            common.BackwardEachTerm.summed = True
        if args.memory:
            # iterations 0 and 1: every lazy regulariser runs at iteration 0, and CDC-style anchor / patch iterations alternate
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            where = PeakWhere(device, method.__file__)
            where.start()
            try:
                run(2, "m")
            finally:
                where.stop()
            print(f"{args.method}.py: size {args.size}, batch {args.batch}, channel multiplier {args.channel_multiplier}, device {device}, "
                  f"threads {torch.get_num_threads()}, torch {torch.__version__}, args {args.method_args!r}")
            print(f"peak memory {peak_memory_mb(device):.0f} MB ({'max allocated' if device.type == 'cuda' else 'peak resident set'}), "
                  f"reached at {where.where}")
            print("highest samples by line (set-up such as RSSA's inversion included): "
                  + "; ".join(f"{line}: {mb:.0f} MB" for line, mb in where.top()))
            return
        base = run(1, "a")
        total = run(1 + args.repeat, "b")
    per_iter = (total - base) / args.repeat
    peaks = runtime.gather_rows(torch.tensor([peak_memory_mb(device)], dtype=torch.float64)).tolist()  # every process's
    print(f"{args.method}.py: size {args.size}, batch {args.batch}, channel multiplier {args.channel_multiplier}, device {device.type}, "
          f"processes {runtime.world_size()}, precision {args.precision}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{per_iter:.3f} s per iteration ({1 / per_iter:.3f} it/s), averaged over {args.repeat} iterations")
    print("peak memory " + ", ".join(f"{mb:.0f}" for mb in peaks) + " MB" + (" (per process)" if len(peaks) > 1 else ""))


def benchmark_asc_parts(args, device):
    """Milliseconds of the parts of progressive_asc.py's L_asc for one batch of --batch latents: the Farneback
    flow (CPU; inline, and in a thread pool as on a GPU), the ASC-specific tensor work (edge map, sampling,
    one roi_align per layer, softmax and KL, and its backward into the features), and the generator passes
    that the official sampling adds for its own latents (G_{n-alpha} forward without grad, G_n forward with
    backward from the ASC layers)."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    import progressive_asc as pasc

    torch.manual_seed(0)
    g = stylegan2.Generator(args.size, channel_multiplier=args.channel_multiplier).to(device)
    g_ema = copy.deepcopy(g).requires_grad_(False)
    z = torch.randn(args.batch, g.style_dim, device=device)  # [B, D]
    layers = pasc.default_asc_layers(g)
    with torch.no_grad():
        img_ref, feats_ref = g_ema([z], return_feats=True)
        img_cur, feats_cur = g([z], return_feats=True)
    leaves = [f.requires_grad_() for f in feats_cur]
    flow = pasc.farneback_flow(img_ref, img_cur, 16)  # [B, 2, H, W]

    def asc_tensor_work():
        edges = pasc.edge_map(img_cur)  # [B, 1, H, W]
        sim_ref, sim_cur, _ = pasc.asc_similarities(feats_ref, leaves, edges, flow, layers, g.size)
        pasc.asc_kl(sim_ref, sim_cur).backward()

    def ema_forward():
        with torch.no_grad():
            g_ema([z], return_feats=True)

    def g_forward_backward():
        g.zero_grad(set_to_none=True)
        _, feats = g([z], return_feats=True)
        sum(feats[layer].mean() for layer in layers).backward()

    with ThreadPoolExecutor(max_workers=args.batch) as pool:
        rows = {
            "flow, inline": timed(lambda: pasc.farneback_flow(img_ref, img_cur, 16), device, args.repeat),
            "flow, thread pool": timed(lambda: pasc.farneback_flow(img_ref, img_cur, 16, pool=pool), device, args.repeat),
            "ASC tensor work": timed(asc_tensor_work, device, args.repeat),
            "G_ema forward": timed(ema_forward, device, args.repeat),
            "G fwd+bwd (ASC layers)": timed(g_forward_backward, device, args.repeat),
        }
    print(f"progressive_asc.py L_asc parts: size {args.size}, batch {args.batch}, channel multiplier {args.channel_multiplier}, "
          f"device {device}, threads {torch.get_num_threads()}, {len(layers)} layers, torch {torch.__version__}")
    for name, seconds in rows.items():
        print(f"{name:24s}{seconds * 1000:10.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channel-multiplier", type=int, default=2)
    parser.add_argument("--channel-cap", type=int, default=None,
                        help="with --method: every layer at most this wide (default: none, rosinality's widths; e.g. 64 for a quick CPU check)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--form", default="auto", choices=["auto", "grouped", "shared"], help="modulated-conv form")
    parser.add_argument("--reference", default=None, help="path of a rosinality/stylegan2-pytorch checkout to time too")
    parser.add_argument("--method", default=None, help="time training iterations of this method file instead (e.g. cdc)")
    parser.add_argument("--method-args", default="", help="extra arguments for the method file, as one string")
    parser.add_argument("--memory", action="store_true",
                        help="with --method: peak memory of the method's first two iterations and the loop line where it is reached, instead of time")
    parser.add_argument("--summed-backward", action="store_true",
                        help="with --method: one backward over the sum of the G step's loss terms (the form before common.BackwardEachTerm)")
    parser.add_argument("--asc-parts", action="store_true", help="time the parts of progressive_asc.py's L_asc instead")
    parser.add_argument("--precision", choices=runtime.PRECISIONS, default="default",
                        help="as the method files' --precision (default: PyTorch's settings); also for the model timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if runtime.world_size() > 1 and not args.method:
        raise SystemExit("under torchrun bench.py times training iterations: add --method")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))

    if args.method:
        device = runtime.init_device(device.type, args.precision)  # under torchrun: this process's GPU, the process group
        benchmark_method(args, device)
        return runtime.end_processes()
    if args.asc_parts:
        return benchmark_asc_parts(args, device)

    torch.manual_seed(0)
    g = stylegan2.Generator(args.size, channel_multiplier=args.channel_multiplier).to(device)
    d = stylegan2.Discriminator(args.size, channel_multiplier=args.channel_multiplier).to(device)
    g.set_modconv_form(args.form)
    runtime.set_precision(device, args.precision)
    runtime.autocast_forwards(args.precision, g, d)
    models = {"ours": (g, d)}
    if args.reference:
        sys.path.insert(0, os.path.abspath(args.reference))
        import model as rosinality

        rg = rosinality.Generator(args.size, 512, 8, channel_multiplier=args.channel_multiplier).to(device)
        rd = rosinality.Discriminator(args.size, channel_multiplier=args.channel_multiplier).to(device)
        rg.load_state_dict(g.state_dict())
        rd.load_state_dict(d.state_dict())
        models["rosinality"] = (rg, rd)

    print(f"size {args.size}, batch {args.batch}, channel multiplier {args.channel_multiplier}, device {device}, "
          f"threads {torch.get_num_threads()}, form {args.form}, precision {args.precision}, torch {torch.__version__}")
    table = {name: benchmark(gm, dm, args, device) for name, (gm, dm) in models.items()}
    header = f"{'':22s}" + "".join(f"{name:>24s}" for name in table)
    print(header)
    for row in next(iter(table.values())):
        cells = "".join(f"{table[name][row]:>12.3f} s {1 / table[name][row]:>6.2f} it/s" for name in table)
        print(f"{row:22s}{cells}")
    if len(table) == 2:
        print("speed-up   " + ", ".join(f"{row}: {table['rosinality'][row] / table['ours'][row]:.2f}x" for row in table["ours"]))
    print(f"peak memory {peak_memory_mb(device):.0f} MB")


if __name__ == "__main__":
    main()
