"""What the methods share as method: the pieces of the StyleGAN2 adaptation recipe every method file uses.

The few-shot target images (decoded once, resumable random batches with flips), style-mixing latents, CDC's
anchors and patch-discriminator head, the StyleGAN2 losses and regularisers (logistic D loss, non-saturating G
loss, lazy R1, path length), Adam with lazy-regularisation scaling, the generator's parameter EMA, LPIPS loading
and GAN inversion into W+. Everything here computes what it says in one process. The machinery (device, several
processes, precision, command line, resume, run folder, log, checkpoint writing, Ctrl-C) is runtime.py's.
"""

import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stylegan2 import ConvLayer

# parameter EMA of the generator: 0.5 ** (32 / 10000), a half-life of 10k images at batch 32 (rosinality, CDC)
EMA_DECAY = 0.5 ** (32 / 10000)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

class UserError(Exception):
    """Bad input from the user; main() prints the message as one line and exits non-zero."""


# ------------------------------------------------------------------------------------------------
# Target images


def list_images(path):
    """Sorted image files of a folder (or the file itself); one-line UserError when there are none."""
    if not os.path.exists(path):
        raise UserError(f"target not found: {path}")
    if os.path.isfile(path):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise UserError(f"target {path} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in target folder {path}")
    return files


def open_rgb(path):
    """A PIL RGB image: alpha composited on white, greyscale / palette expanded; one-line UserError when the
    file cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image.alpha_composite(rgba)
            return image.convert("RGB")
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


def load_image(path, size, allow_upscale=False):
    """One image as uint8 [3, size, size]: RGB (alpha composited on white, greyscale expanded), shorter side
    resized to `size` with LANCZOS, centre-cropped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = open_rgb(path)
    if min(image.size) < size and not allow_upscale:
        raise UserError(
            f"image {path} is {image.size[0]}x{image.size[1]} px, smaller than the generator's {size} px "
            "(use images at least that large, or a checkpoint of matching resolution)"
        )
    image = TF.resize(image, size, interpolation=InterpolationMode.LANCZOS)
    image = TF.center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, H, W]


class ImageFolder:
    """The few-shot target set, decoded once and held in memory as uint8 [N, 3, size, size]."""

    def __init__(self, path, size, allow_upscale=False):
        self.files = list_images(path)
        self.size = size
        self.images = torch.stack([load_image(f, size, allow_upscale) for f in self.files])

    def __len__(self):
        return len(self.files)

    def as_float(self, index=None):
        """Images in [-1, 1], float32 [N, 3, H, W] (all, or those at `index`)."""
        images = self.images if index is None else self.images[index]
        return images.float() / 127.5 - 1

    def sampler(self, batch, device):
        return BatchSampler(self, batch, device)


class BatchSampler:
    """Endless float batches [B, 3, H, W] in [-1, 1] with random horizontal flips, resumable.

    Like the official DataLoader(RandomSampler, drop_last=True): each epoch is a random permutation cut into
    full batches, the remainder dropped (10 images, batch 4: 8 images per epoch). With fewer images than
    `batch`, permutations are chained so every batch is full. state_dict() holds the current epoch's order
    and position, so a resumed run draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, dataset, batch, device):
        self.dataset = dataset
        self.batch = batch
        self.device = device
        self.rows = slice(None)  # every row of a batch (under torchrun, this process's rows: runtime.distribute)
        self.chunks = []  # the current epoch's batches of indices
        self.position = 0

    def _new_epoch(self):
        n, batch = len(self.dataset), self.batch
        if n >= batch:
            order = torch.randperm(n)
            self.chunks = [order[k : k + batch] for k in range(0, n - batch + 1, batch)]
        else:
            order = torch.cat([torch.randperm(n) for _ in range(math.ceil(batch / n))])
            self.chunks = [order[:batch]]
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.chunks):
            self._new_epoch()
        index = self.chunks[self.position]
        self.position += 1
        images = self.dataset.as_float(index)  # [B, 3, H, W]
        flip = torch.rand(len(index)) < 0.5  # [B]
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images[self.rows].to(self.device)

    def state_dict(self):
        return {"chunks": [c.clone() for c in self.chunks], "position": self.position}

    def load_state_dict(self, state):
        self.chunks = list(state["chunks"])
        self.position = int(state["position"])


# ------------------------------------------------------------------------------------------------
# Latents: style mixing and CDC's anchors


def mixing_noise(batch, latent_dim, prob, device):
    """rosinality's mixing_noise: two z (style mixing) with probability `prob`, else one."""
    if prob > 0 and random.random() < prob:
        return list(torch.randn(2, batch, latent_dim, device=device).unbind(0))
    return [torch.randn(batch, latent_dim, device=device)]


def per_sample_noise(g, batch, device):
    """Per-pixel noise maps [B, 1, r, r] for every layer of g, to give two generators the same noise draw."""
    return [torch.randn(batch, 1, n.shape[-2], n.shape[-1], device=device) for n in g.make_noise()]


def make_anchors(n_anchors, latent_dim, device):
    """One fixed z per training image (CDC's init_z), drawn once per run and saved with it."""
    return torch.randn(n_anchors, latent_dim, device=device)  # [K, D]


def sample_anchor_z(anchors, batch, sigma):
    """z = anchors[k] + sigma * eps, k uniform with replacement, eps ~ N(0, I) (CDC's get_subspace)."""
    index = torch.randint(0, anchors.shape[0], (batch,), device=anchors.device)  # [B]
    return anchors[index] + sigma * torch.randn(batch, anchors.shape[1], device=anchors.device)  # [B, D]


def is_anchor_iteration(i, freq):
    """CDC's schedule: iteration i samples from the anchor regions (image-level D) iff i % freq == 0."""
    return freq > 0 and i % freq == 0


# ------------------------------------------------------------------------------------------------
# CDC's patch discriminator head


def patch_map_indices(discriminator):
    """Indices into Discriminator.feature_maps of CDC's patch-level maps, in CDC's order.

    CDC takes the conv1/conv2 outputs of the ResBlocks that are 32x32 or 16x16 with the 32-px width
    (512 channels in rosinality's configuration); at 256 px: convs[3].conv2 (32x32), convs[4].conv1
    (32x32), convs[4].conv2 (16x16), convs[5].conv1 (16x16). The FromRGB map is never one of them.
    """
    width = discriminator.channels[32]
    shapes = discriminator.feature_map_shapes()
    return [
        k
        for k, (channels, res) in enumerate(shapes[:-1])
        if k > 0 and res in (32, 16) and channels == width
    ]


class PatchHead(nn.Module):
    """CDC's patch-level discriminator head (`Extra` in the official code), randomly initialised.

    `new_conv[k]` is ConvLayer(C, 1, 3): an equalised 3x3 conv then a biased leaky ReLU with gain sqrt(2),
    applied to the k-th patch map, giving one realism logit per patch [B, 1, h, w]. State-dict names
    `new_conv.{k}.0.weight`, `new_conv.{k}.1.bias`, as in the official code.
    """

    def __init__(self, channels=512, n_heads=4):
        super().__init__()
        self.new_conv = nn.ModuleList([ConvLayer(channels, 1, 3) for _ in range(n_heads)])

    def forward(self, feature, index):
        return self.new_conv[index](feature)  # [B, 1, h, w]


def make_patch_head(discriminator):
    """A PatchHead with one head per CDC patch map of this discriminator."""
    return PatchHead(discriminator.channels[32], len(patch_map_indices(discriminator)))


def patch_logits(discriminator, head, images, level, map_indices):
    """Patch logits [B, 1, h, w] from patch map `level`; the D blocks after that map are not run."""
    feature = discriminator.feature_maps(images, stop_after=map_indices[level])[-1]  # [B, C, h, w]
    return head(feature, level)


# ------------------------------------------------------------------------------------------------
# GAN losses and regularisers (StyleGAN2, as in rosinality's train.py)


def d_logistic_loss(real_pred, fake_pred):
    # L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))], means over batch and patch positions
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred):
    # L_G = E[softplus(-D(G(z)))] = -E[log sigmoid(D(G(z)))]
    return F.softplus(-fake_pred).mean()


def d_r1_loss(real_pred, real_img):
    """R1 = E_x ||grad_x sum D(x)||^2 (the caller multiplies by gamma / 2 and the lazy interval)."""
    (grad_real,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)  # [B, 3, H, W]
    # ||grad||^2 per sample, mean over the batch
    return grad_real.pow(2).flatten(1).sum(1).mean()


def g_path_regularize(fake_img, latents, mean_path_length, decay=0.01, noise=None, batch=None):
    """Path-length penalty: returns (penalty, updated mean path length (detached), path lengths [B]).

    noise: the random image-space direction y [B, 3, H, W] / sqrt(H W); drawn here when None. batch: under torchrun,
    the global batch whose rows (`rows`) fake_img holds: y is drawn for all of it and the running mean follows the
    mean over all of it (gathered), as in a single process; None: fake_img is the whole batch.
    """
    if noise is None and batch is not None:
        from runtime import rows

        noise = torch.randn(batch, *fake_img.shape[1:], device=fake_img.device)[rows(batch)] / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    if noise is None:
        noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    # J_w^T y, with y ~ N(0, I) / sqrt(H W)
    (grad,) = torch.autograd.grad((fake_img * noise).sum(), latents, create_graph=True)  # [B, n_latent, D]
    # ||J_w^T y|| per sample, root of the mean over the W+ rows of the squared norms
    path_lengths = torch.sqrt(grad.pow(2).sum(2).mean(1))  # [B]
    # a <- a + decay (mean ||J^T y|| - a), the mean over the global batch
    from runtime import gather

    all_lengths = path_lengths if batch is None else gather(path_lengths, batch)  # [B_global]
    path_mean = mean_path_length + decay * (all_lengths.mean() - mean_path_length)
    # (||J_w^T y|| - a)^2
    path_penalty = (path_lengths - path_mean).pow(2).mean()
    return path_penalty, path_mean.detach(), path_lengths


class BackwardEachTerm:
    """The generator step's backward, one loss term at a time: `.backward(term)` runs term.backward() at once, so
    its graph is freed before the next term's forward builds another, and the gradients add up in .grad (a term that
    is off, a tensor without grad, is skipped). The same gradients as one backward over the sum of the terms, up to
    float summation order (a test checks 1e-6 relative), which would keep every term's graph alive at once. Terms that
    share a graph must be given as one term. summed=True (tests, bench.py --summed-backward) switches to that single
    backward over the sum, run by `.finish()`; in the default form `.finish()` has nothing left to do."""

    summed = False

    def __init__(self):
        self.total = None

    def backward(self, loss):
        if not loss.requires_grad:  # a term that is off (a zero tensor)
            return
        if self.summed:
            self.total = loss if self.total is None else self.total + loss
        else:
            loss.backward()

    def finish(self):
        if self.total is not None:
            self.total.backward()
            self.total = None


def make_adam(params, lr, reg_every):
    """Adam(lr c, betas (0, 0.99^c)) with c = k / (k + 1) for a regulariser applied every k steps
    (StyleGAN2's lazy regularisation keeps the effective step size of the main loss)."""
    ratio = reg_every / (reg_every + 1) if reg_every else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0**ratio, 0.99**ratio))


def requires_grad(model, flag=True):
    for parameter in model.parameters():
        parameter.requires_grad_(flag)


@torch.no_grad()
def accumulate(model_ema, model, decay=EMA_DECAY):
    """theta_ema <- decay theta_ema + (1 - decay) theta, over parameters only (buffers stay), as rosinality."""
    ema_params = dict(model_ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].lerp_(param.detach(), 1 - decay)


# ------------------------------------------------------------------------------------------------
# Pretrained perceptual network


LPIPS_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def load_lpips(net="vgg", device="cpu", random_backbone=False):
    """LPIPS distance (pip package `lpips`, version 0.1), frozen, in eval mode; inputs in [-1, 1].

    Its linear calibration layers ship with the package. The ImageNet backbone comes from torchvision the
    standard way (torch hub's cache, downloaded there on first use); when it is neither cached nor
    downloadable, a one-line UserError says which file to put where. random_backbone=True builds a randomly
    initialised backbone instead: for tests only, never a silent fallback. net="toy" is the demo's stand-in, an
    LPIPS-style distance on the toy network's features (demo/toynet.py ToyPerceptual), said when it loads.
    """
    import warnings

    import lpips

    if net == "toy":
        from demo.toynet import load_toy_perceptual

        print("perceptual distance: the demo's toy network (demo/toynet.py), LPIPS-style, in place of LPIPS-VGG")
        return load_toy_perceptual(device)

    if net not in LPIPS_BACKBONE_FILES:
        raise UserError(f"unknown LPIPS network {net!r} (use {', '.join(LPIPS_BACKBONE_FILES)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
            model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as error:
        if random_backbone:
            raise
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"LPIPS-{net} needs torchvision's ImageNet weights {LPIPS_BACKBONE_FILES[net]} in {cache} and they could "
            f"not be downloaded ({reason[:120]}); copy that file there from a machine with internet access"
        ) from None
    model.eval().requires_grad_(False)
    return model.to(device)


# ------------------------------------------------------------------------------------------------
# GAN inversion into W+ (RSSA's target codes; evaluate.py invert / translate / edit)

INVERT_LR_STEP, INVERT_LR_GAMMA = 1000, 0.5  # StepLR of RSSA's official invert_gan.py
INVERT_MEAN_SAMPLES = 5120  # z samples for w_avg, the inversion's starting point (official invert_gan.py)


@torch.no_grad()
def mean_w(g, n=INVERT_MEAN_SAMPLES):
    """w_avg [D]: the mean of g.style(z) over n z ~ N(0, I) drawn from torch's global RNG."""
    device = next(g.parameters()).device
    return g.style(torch.randn(n, g.style_dim, device=device)).mean(0)  # [D]


def invert_wplus(g, images, lpips_fn, steps, lr, w_avg=None):
    """W+ codes of `images` [N, 3, H, W] in [-1, 1] under g, RSSA's official optimisation (invert_gan.py):
    w started at w_avg in every slot (drawn here when None), Adam(lr, betas (0.9, 0.999)) halved every 1000
    steps, g's fixed noise buffers,
        min_w LPIPS(G(w), x) + MSE(G(w), x).
    All images at once (the per-image problems are independent and Adam is elementwise, so this equals one run
    per image). Returns (codes [N, n_latent, D], per-image loss of every step [steps, N])."""
    if w_avg is None:
        w_avg = mean_w(g)  # [D]
    latent = w_avg.repeat(images.shape[0], g.n_latent, 1).requires_grad_(True)  # [N, L, D]
    optim = torch.optim.Adam([latent], lr=lr)
    schedule = torch.optim.lr_scheduler.StepLR(optim, INVERT_LR_STEP, INVERT_LR_GAMMA)
    from runtime import progress_bar

    history = []
    for _ in progress_bar(0, steps):
        recon, _ = g([latent], input_is_latent=True, randomize_noise=False)  # [N, 3, H, W], g's noise buffers
        # LPIPS(G(w_i), x_i) + mean_pixels (G(w_i) - x_i)^2, per image
        losses = lpips_fn(recon, images).flatten() + (recon - images).square().flatten(1).mean(1)  # [N]
        optim.zero_grad()
        losses.sum().backward()
        optim.step()
        schedule.step()
        history.append(losses.detach())
    return latent.detach(), torch.stack(history)
