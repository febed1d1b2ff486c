"""The machinery of a training run, which a reader of a method need not open.

What a method gets from here: the shared command line (`add_common_args`, `parse_args_or_demo`, `finish_args`)
and its resume rules, the device and --precision, seeding and RNG state, several processes under torchrun, the run
folder (samples, checkpoints, log.csv), atomic checkpoints and resume, Ctrl-C, the progress bar, and `run_main`,
which turns user errors into one line and exit status 2.
"""

import argparse
import csv
import functools
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import CheckpointError, extra_config, save_atomically, write_atomically
from common import UserError

# the built-in demo (demo/): a toy-face StyleGAN2 and ten pencil sketches of toy faces, used when a method
# runs with neither --source nor --target
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_SOURCE = os.path.join(DEMO_DIR, "source.pt")
DEMO_TARGET = os.path.join(DEMO_DIR, "targets", "sketch")
# the demo schedule of the GAN methods (our choice): at 1500 iterations CDC's g_ema draws clear sketches of the
# source faces (toy-network FD to the sketch domain 198 -> 45, p(sketch) 0.73; README 'Demo'), in about 3.5
# minutes on 2 CPU cores; the EMA's half-life of 312 iterations makes the grids lag G by a few hundred
DEMO_SCHEDULE = dict(iter=1500, sample_every=250, save_every=500, n_sample=16)

def run_main(main, argv=None):
    """Run main(argv), turning user errors into `error: <message>` on stderr and exit status 2. Under torchrun the
    processes then wait for each other (a Ctrl-C exit too: rank 0 may still be writing its checkpoint) and leave
    the process group; a process that fails exits at once, and torchrun stops the others."""
    try:
        result = main(argv)
    except (UserError, CheckpointError) as error:
        print(f"error: {error}" if is_main() else f"error (rank {rank()}): {error}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, ImportError, AttributeError) as error:
        message = broken_torchvision(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        end_processes()
        raise
    end_processes()
    return result


def broken_torchvision(error):
    """The one-line message for an error raised by importing a torchvision build that does not match torch (e.g.
    "operator torchvision::nms does not exist", the usual result of installing the two from different indexes),
    or None for any other error. torchvision is imported lazily in several places; every entry point passes here."""
    text = str(error).strip()
    if "torchvision" not in text and "torchvision" not in str(getattr(error, "name", "")):
        return None
    try:
        from importlib.metadata import version

        found = f"torchvision {version('torchvision')}"
    except Exception:
        found = "no torchvision"
    torch_version = torch.__version__.split("+")[0]
    return (f"{found} does not work with torch {torch.__version__} ({text.splitlines()[0][:100] if text else type(error).__name__}): "
            f"install a matching pair from one index, e.g. pip install --force-reinstall torch=={torch_version} torchvision")


# ------------------------------------------------------------------------------------------------
# Device, seeding, RNG state


def resolve_device(name):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def seed_everything(seed):
    """Seed Python's random (style-mixing inject index), NumPy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state():
    """All RNG states, in a form torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # under torchrun only this process's GPU (rank 0's, whose stream every process's GPU repeats): reading all
        # of them would start a CUDA context on every GPU of the node
        state["cuda"] = torch.cuda.get_rng_state_all() if world_size() == 1 else [torch.cuda.get_rng_state()]
    return state


def set_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if world_size() == 1 and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        elif world_size() > 1:
            torch.cuda.set_rng_state(state["cuda"][0])  # the training GPU's stream (cuda:0 of the saving process)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------------
# Several processes (torchrun): one device per process, the global batch split across them
#
# `torchrun --nproc_per_node N <method>.py ...` starts N copies of the script; torchrun's environment (WORLD_SIZE,
# RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says which one each is. Without it (a plain `python <method>.py`) none
# of this does anything and the run is exactly the single-process one.
#
# Results do not depend on N. Every process draws the latents, per-pixel noise and real images of the GLOBAL batch
# (--batch) from the same seeded generators, so the random streams are the single-process run's, and keeps its own
# rows (`rows`, `generate_rows`). What couples the samples of a batch (D's minibatch stddev, the path-length mean,
# the methods' cross-sample losses) is computed on tensors gathered over the processes (`gather`), i.e. over the
# global batch. Before every optimiser step the gradients are averaged over the processes (`average_gradients`, which
# `distribute` installs as each optimiser's step pre-hook, so the loops call optimizer.step() as in one process).
#
# Loss scaling: none is needed, for this reason. `gather`'s backward sums the incoming gradient over the processes
# before keeping this process's rows, so the gradients of all processes add up to the gradient of the SUM over
# processes of each process's loss. A per-process mean over its B/N rows (the GAN losses, R1, path length, per-sample
# method terms) sums to N times the mean over the global batch; a loss computed on gathered tensors (CDC's L_dist,
# C3's L_con, ...) is the same number in every process, so it sums to N times that loss. Either way the sum is N times
# the single-process loss, and averaging the gradients over the N processes gives the single-process gradient. (A
# gather whose backward only kept this process's rows would need the gathered losses multiplied by N, and would get
# D's stddev wrong: there each process's loss depends on the other processes' rows.) A batch that N does not divide
# (e.g. a path-length batch of 2 on 4 processes) is not split: every process computes all of it, identically, and
# the average of N equal gradients is that gradient.
#
# Why an explicit all-reduce before each step (`average_gradients`) and not DistributedDataParallel: the loops call the networks
# through methods DDP's forward hook does not see (D.feature_maps for CDC's patch head, G.style, G with feats_upto,
# which leaves the later layers unused), back-propagate several times per step (common.BackwardEachTerm) and through
# autograd.grad with create_graph (R1, path length), and switch requires_grad between the D and G steps. Under DDP
# each of these needs a workaround (find_unused_parameters, no_sync, static graphs); one all-reduce of the flattened
# gradients of the optimiser's parameters, right before its step, is the same arithmetic with no special cases. What
# it gives up is DDP's overlap of the all-reduce with the backward pass.


def world_size():
    """The number of processes (torchrun's WORLD_SIZE; 1 without torchrun). Read from the environment, so it is known
    before the process group starts (while parsing the options)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    """True in the process that writes the run's files and prints (rank 0), and in a single-process run."""
    return rank() == 0


def init_device(name, precision="default"):
    """This process's device (resolve_device), with --precision applied (set_precision). Under torchrun it also joins
    the process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU; the other processes' stdout
    goes to /dev/null, so only rank 0 prints."""
    device = resolve_device(name)
    if world_size() > 1:
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UserError(f"torchrun started more processes on this node than it has GPUs ({torch.cuda.device_count()})")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if not is_main():
            sys.stdout = open(os.devnull, "w")
    set_precision(device, precision)
    return device


def end_processes():
    """Under torchrun: wait until every process gets here, then leave the process group; nothing otherwise."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rows(n):
    """This process's rows of a global batch of n: slice(r n / N, (r + 1) n / N) for rank r of N processes. All
    rows when N does not divide n, or in a single process: then every process computes the whole batch."""
    size = world_size()
    if size == 1 or n % size:
        return slice(None)
    return slice(rank() * n // size, (rank() + 1) * n // size)


def generate_rows(g, styles, **kwargs):
    """g(styles, **kwargs) for this process's rows of the batch of `styles` (z, w or W+ codes): in a single process
    exactly g(styles, **kwargs). Under torchrun the per-pixel noise that g's forward would draw for the whole batch
    is drawn here, layer by layer in the forward's order (up to feats_upto, as the forward), so the random stream
    is the single-process run's; then the codes and the noise (drawn or given per sample) are cut to `rows`."""
    if world_size() == 1:
        return g(styles, **kwargs)
    n = styles[0].shape[0]
    part = rows(n)
    noise = kwargs.get("noise")
    if noise is None and kwargs.get("randomize_noise", True):
        noise = noise_maps(g, n, kwargs.get("feats_upto"))
    if noise is not None:
        kwargs["noise"] = [m if m is None or m.shape[0] != n else m[part] for m in noise]
    return g([s[part] for s in styles], **kwargs)


def noise_maps(g, n, upto=None):
    """The per-pixel noise [n, 1, r, r] of every layer of g (None after layer `upto`) as g's forward draws it when
    given none: layer by layer, from the global RNG on g's device. Drawn ahead, the same values as the forward's."""
    buffers = [getattr(g.noises, f"noise_{k}") for k in range(g.num_layers)]
    return [torch.randn(n, 1, *b.shape[-2:], device=b.device) if upto is None or k <= upto else None for k, b in enumerate(buffers)]


class _SumOverProcesses(torch.autograd.Function):
    """y = sum over processes of x, in every process; its gradient is the same sum (the loss is a sum over processes)."""

    @staticmethod
    def forward(ctx, x):
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _SumOverProcesses.apply(grad)


class _Gather(torch.autograd.Function):
    """Every process's equal share concatenated in rank order; backward: the gradient summed over the processes
    (see the section's note), then this process's rows. Differentiable twice (R1 through D's stddev)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [N b, ...]

    @staticmethod
    def backward(ctx, grad):
        share = grad.shape[0] // world_size()
        return _SumOverProcesses.apply(grad.contiguous())[rank() * share : (rank() + 1) * share]  # [b, ...]


def gather(x, n):
    """The global batch of n rows from this process's rows x (`rows(n)`), with autograd: every process gets the same
    tensor; x itself when it already holds all n rows (a single process, or a batch N does not divide). x may be a
    list of tensors (feature maps of several layers; None entries stay None)."""
    if isinstance(x, (list, tuple)):
        return [gather(t, n) for t in x]
    if x is None or x.shape[0] == n:
        return x
    return _Gather.apply(x)


def gather_shares(x):
    """(the global batch, this process's rows) from x, this process's equal share: the discriminator's hook for its
    minibatch stddev (Discriminator.batch_gather), set by `distribute_discriminator`."""
    n = x.shape[0] * world_size()
    return _Gather.apply(x), rows(n)


def distribute_discriminator(discriminator):
    """Under torchrun: D's minibatch stddev over the global batch (the 4x4 features of every process gathered with
    autograd, a few KB), so D sees the single-process statistics; rosinality's and NVIDIA's DDP loops take it per GPU.
    Every D call of the training loop must then get this process's rows of a batch N divides. Returns D."""
    if world_size() > 1:
        discriminator.batch_gather = gather_shares
    return discriminator


def distribute(discriminator, optimizers, sampler=None):
    """Under torchrun, installed once at set-up so that the training loop reads as the single-process algorithm:
    D's minibatch stddev over the global batch (`distribute_discriminator`), each optimiser's step() first averages
    its gradients over the processes (`average_gradients`, a step pre-hook), and the sampler gives this process's rows
    of each global batch. Nothing in a single process."""
    if world_size() == 1:
        return
    if discriminator is not None:
        distribute_discriminator(discriminator)
    for optimizer in optimizers:
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: average_gradients(opt))
    if sampler is not None:
        sampler.rows = rows(sampler.batch)


def average_gradients(optimizer):
    """The gradients of the optimiser's parameters averaged over the processes (one all-reduce of the flattened
    gradients)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])  # [P], every gradient
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _collective_device():
    """Where tensors for a collective must be: this process's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_processes(values):
    """{name: float} averaged over the processes (one all-reduce; under torchrun each process's losses are those of
    its rows, their average the global batch's); the dict itself in a single process."""
    if world_size() == 1:
        return values
    total = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_collective_device())  # [K]
    dist.all_reduce(total)
    return dict(zip(values, (total / world_size()).tolist()))


def any_process(flag):
    """True when `flag` is true in any process (a Ctrl-C reaches the processes at different moments; all must stop
    after the same iteration); the flag itself in a single process."""
    if world_size() == 1:
        return flag
    return mean_over_processes({"flag": float(flag)})["flag"] > 0


def gather_rows(x):
    """Every process's rows of x concatenated in rank order (any number of rows per process, no autograd), on the
    CPU, in every process: the shards of a sharded evaluation. x is None in a process without rows. x itself in a
    single process."""
    if world_size() == 1:
        return x
    shapes = [None] * world_size()
    dist.all_gather_object(shapes, None if x is None else (tuple(x.shape), x.dtype))
    known = next(s for s in shapes if s is not None)
    rest, dtype = known[0][1:], known[1]
    longest = max(0 if s is None else s[0][0] for s in shapes)
    padded = torch.zeros((longest, *rest), dtype=dtype, device=_collective_device())  # [longest, ...]
    if x is not None:
        padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: 0 if s is None else s[0][0]] for p, s in zip(parts, shapes)]).cpu()


def shard(n):
    """This process's contiguous part of n items (chunks of a sharded evaluation): range(r n / N, (r + 1) n / N),
    so concatenating the parts in rank order (`gather_rows`) restores the order; range(n) in a single process."""
    return range(rank() * n // world_size(), (rank() + 1) * n // world_size())


# ------------------------------------------------------------------------------------------------
# Numerical precision on a GPU (--precision)

PRECISIONS = ("default", "fp32", "tf32", "bf16")


def set_precision(device, precision):
    """--precision: default leaves PyTorch's settings (TF32 convolutions on Ampere and newer, float32 matmuls); fp32
    turns TF32 off for both; tf32 turns it on for both; bf16 keeps the default settings and runs G and D forwards
    under bfloat16 autocast (`autocast_forwards`). On the CPU only default and fp32 (which is what the CPU computes)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r} (use {', '.join(PRECISIONS)})")
    if device.type != "cuda":
        if precision in ("tf32", "bf16"):
            raise UserError(f"--precision {precision} is for CUDA GPUs; this run is on the {device.type.upper()} (use default or fp32)")
        return
    if precision in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast_forwards(precision, *modules):
    """--precision bf16: each module's forward (and a discriminator's feature_maps) runs under bfloat16 autocast and
    returns float32 tensors, so the losses and regularisers after it are computed in float32. Nothing otherwise."""
    if precision != "bf16":
        return

    def as_float(value):
        if torch.is_tensor(value) and value.dtype == torch.bfloat16:
            return value.float()
        if isinstance(value, (list, tuple)):
            return type(value)(as_float(v) for v in value)
        return value

    def wrap(method, device_type):
        @functools.wraps(method)
        def run(*args, **kwargs):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = method(*args, **kwargs)
            return as_float(out)

        return run

    for module in modules:
        device_type = next(module.parameters()).device.type
        module.forward = wrap(module.forward, device_type)
        if hasattr(module, "feature_maps"):
            module.feature_maps = wrap(module.feature_maps, device_type)


# ------------------------------------------------------------------------------------------------
# Command line shared by every method


def add_common_args(parser, origin="official code", **defaults):
    """The interface every method offers. `defaults` overrides per method (e.g. iter=..., batch=...);
    `origin` says in the help texts where those defaults come from."""
    d = dict(
        out=None, iter=5002, batch=4, lr=0.002, seed=1, sample_every=500, save_every=1000, n_sample=25
    )
    d.update(defaults)
    parser.add_argument("--source", default=None, help="source checkpoint in rosinality's format (g, g_ema, d); without --source and --target: the demo")
    parser.add_argument("--target", default=None, help="folder of target images (png/jpg/jpeg/webp/bmp); without --source and --target: the demo")
    parser.add_argument("--out", default=d["out"], help="run folder (default: runs/<method>-<target name>)")
    parser.add_argument("--iter", type=int, default=d["iter"], help=f"training iterations (default {d['iter']}: {origin})")
    parser.add_argument("--batch", type=int, default=d["batch"],
                        help=f"batch size (default {d['batch']}: {origin}); under torchrun the global batch, split across the processes, "
                             "so a run means the same at any process count")
    parser.add_argument("--lr", type=float, default=d["lr"], help=f"base learning rate before lazy-regularisation scaling (default {d['lr']}: {origin})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"seed of torch, numpy and random (default {d['seed']}: {origin}, torch.manual_seed)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--precision", choices=PRECISIONS, default="default",
                        help="on a GPU: default (PyTorch's own settings: TF32 convolutions on Ampere and newer, float32 matmuls; default), "
                             "fp32 (no TF32), tf32 (TF32 convolutions and matmuls), bf16 (G and D forwards under bfloat16 autocast, "
                             "losses and regularisers in float32); on the CPU only default and fp32")
    parser.add_argument("--sample-every", type=int, default=d["sample_every"], help=f"iterations between sample grids (default {d['sample_every']}: {origin}, img_freq)")
    parser.add_argument("--save-every", type=int, default=d["save_every"], help=f"iterations between checkpoints (default {d['save_every']}: {origin}, save_freq)")
    parser.add_argument("--n-sample", type=int, default=d["n_sample"], help=f"images per sample grid (default {d['n_sample']}: {origin}, n_sample)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue a run from a checkpoint path, or with no value from the latest checkpoint of --out (or of the "
                             "default run folder); the run keeps its settings and its run folder (with --out DIR: continued in DIR, "
                             "the original left untouched); --iter, --device, --precision, --sample-every, --save-every and --threads may change")
    parser.add_argument("--demo", action="store_true",
                        help="the demo's settings (toy-face source, the demo's toy networks and schedule) also with --target or --source "
                             "given, e.g. another toy target set (demo/testbed.py); without --source and --target the demo is the default")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out folder that holds an earlier run (its log, samples and checkpoints are deleted first)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch (default 0: torch's own, one per core); on a machine shared with other jobs or with "
                             "few cores 1 is often several times faster (the same as OMP_NUM_THREADS=1)")
    return parser


# options a resumed run may change; every other option keeps the value the run was started with
RESUME_MAY_CHANGE = ("iter", "device", "precision", "sample_every", "save_every", "out", "resume", "overwrite", "threads")


def explicit_options(parser, argv):
    """{dest: value} of the options actually given in argv (defaults left out)."""
    saved_defaults = parser._defaults
    saved = [(action, action.default) for action in parser._actions]
    parser._defaults = {}
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    try:
        return vars(parser.parse_args(argv))
    finally:
        parser._defaults = saved_defaults
        for action, default in saved:
            action.default = default


def parse_args_or_demo(parser, argv, method, target=DEMO_TARGET, path_options=(), run_name=None, **demo_defaults):
    """parser.parse_args, except that with neither --source nor --target (or with --demo) the run is the
    built-in demo: the shipped toy-face source, `target`, and `demo_defaults` (iterations, cadence, toy
    networks, ...) in place of the method's defaults; options given on the command line (a --target of
    --demo included) still win. args.demo says which it was.

    With --resume the run continues with the settings it was started with (read from the checkpoint), so
    `python <method>.py --resume PATH` works from any folder; see `resume_args`. Paths (--source, --target and
    the method's `path_options`, comma lists included) become absolute. Nothing is printed or created here:
    `finish_args` does that once the method has validated its options. `run_name(args)` names the default run
    folders (runs/<name>-<target>, runs/<name>-demo; default: the method), e.g. by a --baseline choice."""
    args = parser.parse_args(argv)
    args.run_name = run_name(args) if run_name else method
    if args.resume is not None:
        return resume_args(parser, argv, args, method)
    demo_why = "--demo" if args.demo else "no --source/--target given"
    args.demo = args.demo or (args.source is None and args.target is None)
    if args.demo:
        if not os.path.exists(DEMO_SOURCE):
            raise UserError(f"the demo's source checkpoint {DEMO_SOURCE} is missing; rebuild it with: python -m demo.pretrain_source")
        parser.set_defaults(source=DEMO_SOURCE, target=target, **demo_defaults)
        args = parser.parse_args(argv)
        args.demo = True
        args.run_name = run_name(args) if run_name else method
    elif args.source is None or args.target is None:
        raise UserError("give both --source and --target (or neither, to run the built-in demo)")
    args.method = method
    _absolute_paths(args, ("source", "target", *path_options))
    # the options as parsed, before a method derives anything from them: what a resumed run starts from
    args.run_args = dict(args_to_dict(args), path_options=",".join(path_options))
    args.demo_why = demo_why  # for finish_args' banner
    return args


def _absolute_paths(args, names):
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, ",".join(os.path.abspath(p) if p else p for p in value.split(",")))


def checkpoint_run_folder(path):
    """The run folder a checkpoint belongs to (<run>/checkpoints/NNNNNN.pt -> <run>), else None."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def holds_run(folder):
    """True when `folder` holds a run's log or checkpoints (caches and empty folders do not count)."""
    checkpoints = os.path.join(folder, "checkpoints")
    return os.path.exists(os.path.join(folder, "log.csv")) or (
        os.path.isdir(checkpoints) and any(n.endswith(".pt") for n in os.listdir(checkpoints)))


def _same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def resume_args(parser, argv, args, method):
    """The options of a resumed run: those stored in the checkpoint (`run_args`), then the options given now
    that a resumed run may change (RESUME_MAY_CHANGE); any other option given with a different value is an
    error. The run folder is the checkpoint's own (<run>/checkpoints/x.pt -> <run>), or an explicit --out,
    which then gets a copy of the log so far and leaves the original run untouched."""
    given = explicit_options(parser, argv)
    folder = args.out
    if args.resume == "auto" and folder is None:
        if args.source is None and args.target is None:
            folder = os.path.join("runs", f"{args.run_name}-demo")
        elif args.source is None or args.target is None:
            raise UserError("give both --source and --target (or neither, for the demo), or --resume with a checkpoint path")
        else:
            folder = default_out_dir(args.run_name, args.target)
    path = os.path.abspath(resolve_resume(args.resume, RunDir(folder or ".")))
    state = load_training_checkpoint(path)
    stored = state.get("run_args")
    if stored is None:
        raise UserError(f"{path} was written before checkpoints recorded their run's settings; start a new run")
    if stored.get("method") != method:
        raise UserError(f"{path} is a {stored.get('method')}.py checkpoint; resume it with {stored.get('method')}.py")
    values = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    values.update(stored)
    path_options = ("source", "target", *stored.get("path_options", "").split(","))
    for name, value in given.items():
        if name in RESUME_MAY_CHANGE:
            values[name] = value
            continue
        old = values.get(name)
        if name in path_options and isinstance(value, str) and isinstance(old, str):
            value = ",".join(os.path.abspath(p) if p else p for p in value.split(","))
        if value != old:
            option = "--" + name.replace("_", "-")
            raise UserError(f"{option} {value} differs from the resumed run's {old}; a resumed run keeps its settings "
                            "(only --iter, --device, --precision, --sample-every, --save-every, --threads, --out may change)")
    run_folder = checkpoint_run_folder(path)
    if given.get("out") is None:
        if run_folder is None:
            raise UserError(f"{path} is not inside a run folder (<run>/checkpoints/); give --out DIR for the continued run")
        values["out"] = run_folder
    elif run_folder is None or not _same_path(given["out"], run_folder):
        if holds_run(given["out"]):
            raise UserError(f"--out {given['out']} already holds another run; continue a run in a new, empty folder")
    resumed = argparse.Namespace(**values)
    resumed.resume = path
    # what the next resume starts from: the original options with this resume's new schedule
    resumed.run_args = dict(stored, **{k: v for k, v in given.items() if k in ("iter", "device", "precision", "sample_every", "save_every")})
    return resumed


def check_common_args(args):
    for name in ("iter", "batch", "sample_every", "save_every", "n_sample"):
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if getattr(args, "threads", 0) < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.batch % world_size():
        raise UserError(f"--batch {args.batch} is the global batch, split across the {world_size()} processes: use a multiple of {world_size()}")


def finish_args(args):
    """The last step of every method's parse_args, once its options are valid: the run folder and the demo
    banner (rank 0's, under torchrun). A resumed run keeps the folder `resume_args` chose. A new run with the default folder
    (runs/<method>-<target>, runs/<method>-demo) takes the first of <name>, <name>-2, <name>-3, ... that holds
    no run; an explicit --out that holds a run is refused unless --overwrite, so no run ever writes over
    another. Nothing is created on disk here: files appear when the run writes its first output."""
    if args.resume is None:
        if args.out is None:
            base = os.path.join("runs", f"{args.run_name}-demo") if args.demo else default_out_dir(args.run_name, args.target)
            args.out, k = base, 1
            while holds_run(args.out):
                k += 1
                args.out = f"{base}-{k}"
        elif holds_run(args.out) and not args.overwrite:
            raise UserError(f"--out {args.out} already holds a run (log.csv, checkpoints): continue it with --resume, "
                            "choose another --out, or add --overwrite to replace it")
        elif args.overwrite and is_main():
            clear_run(args.out)
    args.run_args["out"] = args.out
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.demo and args.resume is None and is_main():
        print(f"demo: {args.demo_why}, so adapting {os.path.relpath(args.source)} with the demo's settings "
              f"to {os.path.relpath(args.target)} for {args.iter} iterations into {args.out} (README, 'Demo')", file=sys.stderr)
    return args


def clear_run(folder):
    """Delete a run's log, sample grids and checkpoints (for --overwrite); other files (caches) stay."""
    import shutil

    if os.path.exists(os.path.join(folder, "log.csv")):
        os.remove(os.path.join(folder, "log.csv"))
    for name in ("samples", "checkpoints"):
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Run folder, logging, sample grids, checkpoints


class RunDir:
    """<out>/samples/*.png, <out>/checkpoints/*.pt, <out>/log.csv. Nothing is created here: the folders appear
    with the first file written into them (so a run that fails at start-up leaves no folder behind)."""

    def __init__(self, out):
        self.root = out
        self.samples = os.path.join(out, "samples")
        self.checkpoints = os.path.join(out, "checkpoints")
        self.log_path = os.path.join(out, "log.csv")

    def sample_path(self, i):
        return os.path.join(self.samples, f"{i:06d}.png")

    def checkpoint_path(self, i):
        return os.path.join(self.checkpoints, f"{i:06d}.pt")

    def latest_checkpoint(self):
        if not os.path.isdir(self.checkpoints):
            return None
        names = sorted(n for n in os.listdir(self.checkpoints) if n.endswith(".pt") and n[:-3].isdigit())
        return os.path.join(self.checkpoints, names[-1]) if names else None


class CSVLog:
    """Appends one row per logged iteration to log.csv (columns fixed by the first row).

    A resumed run (resume_from = the iteration it continues at) keeps the rows before that iteration of the
    log of the checkpoint's run (`resumed_checkpoint`'s <run>/log.csv): in place when that is this log, as a
    copy when the run continues in another folder, whose original log is then only read. Under torchrun only rank 0
    touches the file (the values it writes are already averaged over the processes)."""

    def __init__(self, path, resume_from=None, resumed_checkpoint=None):
        self.path = path
        self.columns = None
        if not is_main():
            return
        if resume_from is None:
            if os.path.exists(path):
                os.remove(path)
            return
        folder = checkpoint_run_folder(resumed_checkpoint) if resumed_checkpoint else os.path.dirname(path)
        previous = os.path.join(folder, "log.csv") if folder else path
        if os.path.exists(previous):
            with open(previous, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.columns = rows[0]
                kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < resume_from]
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def write(self, i, values):
        if not is_main():
            return
        row = {"iter": i, **{k: float(v) for k, v in values.items()}}
        if self.columns is None:
            self.columns = list(row)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self.columns])


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def image_grid(images, nrow):
    """[N, 3, H, W] in [-1, 1] -> uint8 grid [3, H', W'] with 2-px borders (torchvision.utils.make_grid)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # [3, H', W']


def save_png(path, grid):
    """Writes the PNG atomically (rank 0 only under torchrun)."""
    from PIL import Image

    if not is_main():
        return
    write_atomically(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))


def save_comparison_grid(path, source_images, adapted_images, nrow=None):
    """Source G_s(z) grid on the left, adapted G_t(z) grid on the right, the same z at the same place."""
    nrow = nrow or max(1, int(math.sqrt(source_images.shape[0])))
    left = image_grid(source_images, nrow)
    right = image_grid(adapted_images, nrow)
    gap = torch.full((3, left.shape[1], max(8, left.shape[2] // 40)), 255, dtype=torch.uint8)
    save_png(path, torch.cat([left, gap, right], 2))


def save_checkpoint(path, state):
    """torch.save to a temporary file in the same folder, then an atomic rename: never a half-written file
    (checkpoints.save_atomically, which `python checkpoints.py convert` uses too). Rank 0 only under torchrun: every
    process holds the same state."""
    if is_main():
        save_atomically(state, path)


_last_training_checkpoint = {}


def load_training_checkpoint(path):
    """A checkpoint written by one of our method files (for --resume), with one-line errors. The file read
    while parsing --resume is kept until the training loop asks for it, so a large checkpoint is read once."""
    from checkpoints import read_checkpoint

    key = _file_key(path)
    if key is not None and key in _last_training_checkpoint:
        return _last_training_checkpoint.pop(key)
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "iter" not in state or "g" not in state:
        raise UserError(f"{path} is not a checkpoint written by this project's training (no 'iter'); cannot resume from it")
    _last_training_checkpoint.clear()
    if key is not None:
        _last_training_checkpoint[key] = state
    return state


def _file_key(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), info.st_mtime_ns, info.st_size


def resume_command(script, checkpoint):
    """The command that continues a run from `checkpoint`, with absolute paths: it works as printed from any folder.
    Under torchrun, a torchrun command with this node's process count (any count gives the same run)."""
    import shlex

    launcher = "python" if world_size() == 1 else f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size())}"
    return f"{launcher} {shlex.quote(os.path.abspath(script))} --resume {shlex.quote(os.path.abspath(checkpoint))}"


def resolve_resume(resume, run_dir):
    """--resume value -> checkpoint path or None. 'auto' means the run folder's latest checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        path = run_dir.latest_checkpoint()
        if path is None:
            raise UserError(f"--resume: no checkpoint in {run_dir.checkpoints} to resume from")
        return path
    if not os.path.exists(resume):
        raise UserError(f"--resume: checkpoint not found: {resume}")
    return resume


def training_state(i, args, g, g_ema, d, g_optim, d_optim, **extra):
    """A checkpoint in rosinality's layout (g, g_ema, d, g_optim, d_optim, args) plus our keys: the iteration
    to continue from, all RNG states, and whatever the method adds (patch head, anchors, ...). `args` is
    stored as a plain dict so that the file loads with weights_only=True."""
    state = {
        "g": g.state_dict(),
        "g_ema": g_ema.state_dict(),
        "d": d.state_dict(),
        "g_optim": g_optim.state_dict(),
        "d_optim": d_optim.state_dict(),
        "args": args_to_dict(args),
        "iter": i,
        "rng": get_rng_state(),
    }
    if getattr(args, "run_args", None) is not None:
        state["run_args"] = args.run_args  # the options the run was started with, for --resume
    extras = extra_config({"g": g, "d": d})
    if extras:
        state["extra_config"] = extras  # what the rosinality layout cannot say (an NVIDIA source's conv_clamp, ...)
    state.update(extra)
    return state


def load_optimizer_moments(optimizer, state):
    """Load a source run's Adam state (moments, step counts) but keep this run's lr and betas."""
    hyper = [(group["lr"], group["betas"]) for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"the source checkpoint's optimiser state does not fit its networks ({reason[:160]}); use --ignore-source-optim") from None
    for group, (lr, betas) in zip(optimizer.param_groups, hyper):
        group["lr"], group["betas"] = lr, betas


def restore_training_state(state, g, g_ema, d, g_optim, d_optim):
    """Load the networks and optimisers of a `training_state` checkpoint; returns the iteration to continue from."""
    try:
        g.load_state_dict(state["g"])
        g_ema.load_state_dict(state["g_ema"])
        d.load_state_dict(state["d"])
        g_optim.load_state_dict(state["g_optim"])
        d_optim.load_state_dict(state["d_optim"])
    except (KeyError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"the resume checkpoint does not match this run's models ({reason[:200]})") from None
    set_rng_state(state["rng"])
    return int(state["iter"])


class StopOnInterrupt:
    """Ctrl-C (SIGINT) only sets `.requested`; the training loop checks it after each iteration, writes a
    checkpoint and exits cleanly, so no iteration is left half-done. A second Ctrl-C aborts at once. Under torchrun,
    torchrun passes the Ctrl-C on to every process, each at its own moment: the loop asks `any_process`, so all stop
    after the same iteration, and rank 0 writes the checkpoint (within torchrun's 30 s before it kills them)."""

    def __enter__(self):
        import signal

        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            if is_main():
                print("\ninterrupted: saving a checkpoint after this iteration (Ctrl-C again to abort)", file=sys.stderr)

        try:
            signal.signal(signal.SIGINT, handler)
            self._installed = True
        except ValueError:  # not the main thread: keep the default behaviour
            self._installed = False
        return self

    def __exit__(self, *exc):
        import signal

        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ------------------------------------------------------------------------------------------------
# A training run's lifecycle


class Run(RunDir):
    """A method's training run: its folder (RunDir), --resume, the iterations with a progress bar, log.csv, the sample
    grids, the checkpoints and Ctrl-C. The method gives `checkpoint(i_next)` (the state dict a checkpoint holds) and
    `samples(i)` (writes the sample grids of iteration i) to `iterations`; the loop ends each iteration with
    `end_iteration(i, losses)` and the run with `finish()`."""

    def __init__(self, args, script):
        super().__init__(args.out)
        self.args, self.script = args, script
        self.resume_path = resolve_resume(args.resume, self)
        self.start = 0  # the iteration the loop starts at; a resumed run sets it
        self.make_checkpoint = self.write_samples = None

    def resume_state(self):
        """The checkpoint dict --resume continues from; None for a new run."""
        return load_training_checkpoint(self.resume_path) if self.resume_path else None

    def iterations(self, checkpoint, samples):
        """range(start, --iter) under a progress bar. A Ctrl-C only sets a flag: `end_iteration` stops the run after the
        iteration it is in, with a checkpoint."""
        self.make_checkpoint, self.write_samples = checkpoint, samples
        if self.resume_path:
            print(f"resuming {self.resume_path} at iteration {self.start}")
        self.log = CSVLog(self.log_path, resume_from=self.start if self.resume_path else None, resumed_checkpoint=self.resume_path)
        self.pbar = progress_bar(self.start, self.args.iter)
        self.interrupt = StopOnInterrupt().__enter__()
        try:
            yield from self.pbar
        finally:
            self._close()

    def _close(self):
        if self.interrupt is not None:  # once: at the loop's end, or at a Ctrl-C stop (then the loop is left unfinished)
            self.pbar.close()
            self.interrupt.__exit__(None, None, None)  # the previous Ctrl-C handler back
            self.interrupt = None

    def save(self, i_next):
        path = self.checkpoint_path(i_next)
        save_checkpoint(path, self.make_checkpoint(i_next))
        return path

    def end_iteration(self, i, losses):
        """After iteration i: the losses ({name: tensor or float}, averaged over the processes under torchrun) to the
        progress bar and log.csv; the sample grids every --sample-every iterations, a checkpoint every --save-every;
        after a Ctrl-C a checkpoint, then exit status 130."""
        losses = mean_over_processes({name: float(value.detach() if torch.is_tensor(value) else value) for name, value in losses.items()})
        self.pbar.set_postfix_str(format_losses(losses))
        self.log.write(i, losses)
        if i % self.args.sample_every == 0:
            self.write_samples(i)
        if (i + 1) % self.args.save_every == 0:
            self.save(i + 1)
        if any_process(self.interrupt.requested):
            path = self.save(i + 1)
            self._close()
            done = f"{i + 1} iteration{'s' if i else ''} done"
            print(f"stopped by Ctrl-C, {done} of {self.args.iter} (saved in {os.path.basename(path)}); resume with: "
                  f"{resume_command(self.script, path)}")
            raise SystemExit(130)

    def finish(self):
        """The last sample grids and checkpoint; returns the checkpoint's path."""
        self.write_samples(self.args.iter)
        return self.save(self.args.iter)


def check_discriminator_batch(batch):
    """The minibatch-stddev layer pools groups of min(B, 4): B above 4 must be a multiple of 4."""
    if batch > 4 and batch % 4:
        raise UserError(f"--batch {batch}: the discriminator's minibatch-stddev groups need a batch of at most 4 or a multiple of 4")


def progress_bar(start, total):
    """tqdm over iterations [start, total); call .set_postfix_str(format_losses(...)) with the current losses. Shown
    by rank 0 only under torchrun."""
    from tqdm import tqdm

    return tqdm(range(start, total), initial=start, total=total, dynamic_ncols=True, smoothing=0.05, disable=not is_main())


def format_losses(values):
    return " ".join(f"{k} {float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in values.items())


def args_to_dict(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def default_out_dir(method, target):
    name = os.path.splitext(os.path.basename(os.path.normpath(target)))[0] or "target"
    return os.path.join("runs", f"{method}-{name}")
