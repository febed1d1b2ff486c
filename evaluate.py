"""The papers' metrics and pictures for adapted generators, one subcommand each.

Metrics
    fid        FID of generated images (or a folder) against a folder of real target images, CDC's protocol:
               pytorch-fid's Inception (TF-FID port), pool3 features, its bilinear resize to 299; equal to
               `python -m pytorch_fid real_dir fake_dir` for the same two folders. Real-set statistics are cached.
    iclpips    Intra-cluster LPIPS (CDC, Table 2): N generated images, each assigned to the training image with
               the smallest LPIPS-VGG distance; mean pairwise LPIPS inside each cluster (at most 50 members,
               seeded); mean and std over clusters, and how many clusters had fewer than 2 members.
    is         Inception Score, 10 splits, torchvision's ImageNet Inception-v3 on images in [-1, 1] at their
               own size (RSSA's and the progressive paper's protocol; --resize for the usual 299 px).
    kid        Kernel Inception Distance (cubic polynomial kernel, unbiased MMD^2, mean and std over 100
               subsets) on the same pool3 features as FID.
    density-coverage
               Naeem et al. 2020's density and coverage (k nearest neighbours, k = 5) of generated against real
               images on the same pool3 features (CDC's supplement, Table 4).
    pair       The same z and noise through two generators: LPIPS, MSE and the cosine similarity of a feature
               network's embeddings (an ArcFace identity network when given, else Inception pool3) between the
               two image sets (the progressive ASC paper's reconstruction, Table 2).
    compare    Several checkpoints against the same real / training sets: a Markdown table and a CSV.
Pictures
    grid        the same z through the source and each adapted generator, one row per model (the papers' figure)
    interpolate linear paths in Z between fixed z as an animated GIF, source and adapted side by side
    export      N generated images as PNGs, for external tools
Real images
    invert      W+ codes of a folder of photos under the source: RSSA's optimisation (LPIPS-VGG + MSE), or an
                e4e encoder; one codes.pt (file name -> [n_latent, D]) and a reconstruction grid
    translate   each photo, its source reconstruction and the same code through every adapted generator
    edit        latent edits of each photo's code (InterFaceGAN-style direction files, or the source's GANSpace
                components pc0, pc1, ...), rendered by the source and each adapted generator, one strip per photo

Generators are the `g_ema` of each checkpoint (rosinality format or ours). Truncation (< 1) uses the source
generator's mean w (4096 samples) for every model, as CDC's generate.py. Generated images are quantised to
8 bits exactly as a saved PNG would be before any metric sees them.

Under torchrun (`torchrun --nproc_per_node N -- evaluate.py fid ...`) the metric commands shard their sampling and
feature extraction across the processes and print the numbers of the single-process run (SHARDED_COMMANDS).

Pretrained weights come the standard way (torch hub cache: pytorch-fid's `pt_inception-2015-12-05-*.pth`,
torchvision's Inception-v3 and VGG16); when missing and not downloadable the command stops with one line
saying which file to put where. `--random-weights` builds the same networks randomly initialised, for tests only;
every number they compute is printed with "(random Inception)" or "(random VGG)" in its name.

A Ctrl-C ends any command with one line on stderr, what was finished when that is known (the pictures written so
far stay, never half-written), and exit status 130.
"""

import argparse
import contextlib
import csv
import hashlib
import math
import os
import random
import re
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import runtime
from common import UserError
from checkpoints import load_checkpoint, read_checkpoint, write_atomically

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fewshot-gan-adaptation")


# ------------------------------------------------------------------------------------------------
# Networks with pretrained weights


def _weights_error(command, what, filename, error):
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"evaluate.py {command} needs {what} {filename} in {cache} and it could not be downloaded "
        f"({reason[:120]}); copy that file there from a machine with internet access"
    )


def _random_fid_inception():
    """pytorch-fid's FID Inception architecture with random weights (tests only)."""
    from pytorch_fid import inception as fid

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


def load_fid_inception(device, random_weights=False, dims=2048, command="fid"):
    """pytorch-fid's InceptionV3 returning the 2048-d pool3 features (as `python -m pytorch_fid` builds it);
    dims 64 / 192 / 768 select an earlier block, as pytorch-fid's --dims. `command` names the evaluate.py
    command in the error when the weights are missing."""
    from unittest import mock

    from pytorch_fid import inception as fid

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if random_weights:
                with mock.patch.object(fid, "fid_inception_v3", _random_fid_inception):
                    model = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
            else:
                model = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except UserError:
        raise
    except Exception as error:
        raise _weights_error(command, "pytorch-fid's Inception weights", os.path.basename(fid.FID_WEIGHTS_URL), error) from None
    return model.eval().requires_grad_(False).to(device)


def load_is_inception(device, random_weights=False, command="is"):
    """torchvision's ImageNet Inception-v3 (1000 classes), transform_input=False, as the IS scripts use it."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = None if random_weights else Inception_V3_Weights.IMAGENET1K_V1
            model = inception_v3(weights=weights, aux_logits=True, transform_input=False, init_weights=random_weights)
    except Exception as error:
        raise _weights_error(command, "torchvision's ImageNet Inception-v3 weights", "inception_v3_google-0cc3c7bd.pth", error) from None
    return model.eval().requires_grad_(False).to(device)


def random_label(args, network):
    """' (random VGG)' after the name of a number computed by `network` when --random-weights randomised it, else ''."""
    return f" (random {network})" if args.random_weights else ""


# ------------------------------------------------------------------------------------------------
# Images: generated (quantised like a PNG) and read from folders


def load_generator(path, device):
    """The g_ema of a checkpoint, in eval mode; for an RSSA checkpoint that holds its target codes, g_ema behind
    RSSA's latent compression P (rssa.CompressedGenerator), since P is part of RSSA's adapted model; for a
    MineGAN or BSA checkpoint of baselines.py, g_ema with its miner or scale / shift (baselines.adapted_generator)."""
    models, raw = load_checkpoint(path, require=("g_ema",), device=device)
    if raw.get("miner") is not None or raw.get("scale_shift") is not None:
        from baselines import adapted_generator

        return adapted_generator(path, device)
    if raw.get("latent_codes") is not None and raw.get("blend") is not None:
        from rssa import CompressedGenerator

        return CompressedGenerator(models["g_ema"], raw["latent_codes"].to(device), raw["blend"].to(device)).eval()
    return models["g_ema"]


def to_uint8(images):
    """[-1, 1] float -> uint8 exactly as torchvision.utils.save_image writes a PNG (clamp, x255, +0.5)."""
    return ((images.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(g, z, batch, truncation=1.0, w_avg=None, noise=None, progress=None, features=None):
    """uint8 images [N, 3, H, W] on the CPU for latents z [N, D], in chunks of `batch`; noise: fixed maps or None
    (random). features: a function of a chunk's uint8 images (e.g. pool3 features, `inception_batch`): then its
    results, concatenated, in place of the images, and no more than a chunk of images is ever held.

    Under torchrun each process renders a contiguous share of the chunks (runtime.shard) and the results are
    gathered in chunk order, in every process. Every process draws the random noise of every chunk, in order, so
    each chunk gets the noise it gets in a single process, and the results are the single-process ones."""
    starts = range(0, len(z), batch)
    mine = runtime.shard(len(starts))
    out = []
    for k in tqdm(range(len(starts)), desc=progress, disable=progress is None or not runtime.is_main(), leave=False):
        chunk = z[starts[k] : starts[k] + batch]
        chunk_noise = noise
        if noise is None and runtime.world_size() > 1:
            chunk_noise = runtime.noise_maps(g, len(chunk))  # the forward's own draw, made here for every chunk
        if k not in mine:
            continue
        images, _ = g([chunk], truncation=truncation, truncation_latent=w_avg, noise=chunk_noise,
                      randomize_noise=noise is None)
        images = to_uint8(images).cpu()
        out.append(images if features is None else features(images))
    return runtime.gather_rows(torch.cat(out) if out else None)


def read_folder(path):
    """uint8 images of a folder (RGB, original size), sorted by name, as pytorch-fid reads them."""
    from PIL import Image

    files = common.list_images(path)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1))
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"cannot read image {file}: {reason}") from None
    return files, images


def _batches_by_size(images, batch):
    """Consecutive batches of equally sized images (a folder may mix sizes)."""
    start = 0
    while start < len(images):
        size = images[start].shape
        end = start
        while end < len(images) and end - start < batch and images[end].shape == size:
            end += 1
        yield torch.stack(list(images[start:end]))
        start = end


# ------------------------------------------------------------------------------------------------
# FID and KID (pool3 features of pytorch-fid's Inception)


@torch.no_grad()
def inception_batch(model, images, device):
    """Pool3 features [b, dims] (float64, CPU) of uint8 images [b, 3, H, W], fed as pytorch-fid feeds files (x / 255)."""
    pred = model(images.to(device).float() / 255)[0]  # [b, dims, 1, 1]
    if pred.shape[2] != 1 or pred.shape[3] != 1:  # an earlier block (--dims < 2048): average over positions
        pred = F.adaptive_avg_pool2d(pred, (1, 1))
    return pred.squeeze(3).squeeze(2).cpu().double()  # [b, dims]


def inception_features(model, images, batch, device, desc=None):
    """Pool3 features [N, 2048] (float64 numpy) of uint8 images, in batches of equally sized images; under
    torchrun each process computes a contiguous share of the batches and the features are gathered, in order."""
    chunks = list(_batches_by_size(images, batch))
    mine = runtime.shard(len(chunks))
    feats = [inception_batch(model, chunk, device)
             for k, chunk in enumerate(tqdm(chunks, desc=desc, disable=desc is None or not runtime.is_main(), leave=False)) if k in mine]
    return runtime.gather_rows(torch.cat(feats) if feats else None).numpy()


def feature_statistics(feats):
    """mu [2048], sigma [2048, 2048] as pytorch-fid computes them (np.cov, unbiased)."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), pytorch-fid's implementation."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def real_statistics(folder, model, batch, device, cache_dir=CACHE_DIR, weights_tag="pretrained-2048"):
    """(mu, sigma, n) of a real folder, cached in cache_dir by folder path, file names, sizes and times."""
    files = common.list_images(folder)
    if len(files) < 2:
        raise UserError(f"FID needs at least 2 real images (a covariance); {folder} has {len(files)}")
    key = hashlib.sha1(weights_tag.encode())
    for file in files:
        stat = os.stat(file)
        key.update(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cache = os.path.join(cache_dir, f"fid_stats_{key.hexdigest()[:16]}.npz")
    if not runtime.any_process(not os.path.exists(cache)):  # under torchrun: used when every process has it
        data = np.load(cache)
        return data["mu"], data["sigma"], int(data["n"])
    _, images = read_folder(folder)
    feats = inception_features(model, images, batch, device, desc="real images")
    mu, sigma = feature_statistics(feats)
    if runtime.is_main():
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma, n=len(files))
        os.replace(tmp, cache)
    return mu, sigma, len(files)


def kernel_inception_distance(feats_real, feats_fake, n_subsets=100, subset_size=1000, seed=0):
    """KID: mean and std over subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    rng = np.random.RandomState(seed)
    m = min(len(feats_real), len(feats_fake), subset_size)
    if m < 2:
        raise UserError("KID needs at least 2 real and 2 generated images")
    d = feats_real.shape[1]
    values = []
    for _ in range(n_subsets):
        x = feats_fake[rng.choice(len(feats_fake), m, replace=False)]
        y = feats_real[rng.choice(len(feats_real), m, replace=False)]
        # k(a, b) = (a.b / d + 1)^3
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2
        mmd = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------------------------------------
# Inception Score


@torch.no_grad()
def inception_probabilities(model, images, batch, device, resize=False):
    """softmax class probabilities [N, 1000] of uint8 images mapped to [-1, 1] (optionally resized to 299); under
    torchrun each process computes a contiguous share of the batches and the results are gathered, in order."""
    if not resize and min(min(image.shape[-2:]) for image in images) < 75:
        raise UserError("the Inception Score at native size needs images of at least 75 px; use --resize (299 px)")
    chunks = list(_batches_by_size(images, batch))
    probs = []
    for k in runtime.shard(len(chunks)):
        x = chunks[k].to(device).float() / 127.5 - 1  # [b, 3, H, W] in [-1, 1]
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        probs.append(F.softmax(model(x), dim=1).cpu().double())
    return runtime.gather_rows(torch.cat(probs) if probs else None).numpy()


def inception_score(probs, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) per split; mean and std over the splits."""
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(axis=0, keepdims=True)  # [1, 1000]
        # KL(p(y|x) || p(y)) = sum_y p(y|x) (log p(y|x) - log p(y))
        kl = (part * (np.log(part + 1e-12) - np.log(p_y + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# Intra-cluster LPIPS


def _lpips_input(images, size):
    """uint8 [N, 3, H, W] -> float in [-1, 1] at size x size (bilinear, as the official Resize([256, 256]))."""
    x = images.float() / 127.5 - 1
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def lpips_features(model, x):
    """Unit-normalised backbone features of LPIPS for x in [-1, 1]: computed once per image."""
    import lpips

    outs = model.net.forward(model.scaling_layer(x))
    return [lpips.normalize_tensor(o) for o in outs]


@torch.no_grad()
def lpips_from_features(model, feats_a, feats_b):
    """LPIPS(a, b) [N] from `lpips_features` of a and b: sum_l mean_hw w_l . (f_a^l - f_b^l)^2 (version 0.1)."""
    total = 0
    for layer, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        # w_l . (f_a - f_b)^2, averaged over positions
        total = total + model.lins[layer](torch.square(fa - fb)).mean([2, 3])  # [N, 1]
    return total[:, 0]


@torch.no_grad()
def assign_clusters(model, generated, centers, batch, device, size=256):
    """Index of the training image with the smallest LPIPS to each generated image [N]; under torchrun each process
    assigns a contiguous share of the batches and the indices are gathered, in order."""
    center_feats = lpips_features(model, _lpips_input(centers, size).to(device))
    starts = range(0, len(generated), batch)
    assignment = []
    for start in tqdm([starts[k] for k in runtime.shard(len(starts))], desc="assigning", disable=not runtime.is_main(), leave=False):
        feats = lpips_features(model, _lpips_input(generated[start : start + batch], size).to(device))
        b = feats[0].shape[0]
        dist = torch.stack([
            lpips_from_features(model, feats, [c[k : k + 1].expand(b, -1, -1, -1) for c in center_feats])
            for k in range(len(centers))
        ], 1)  # [b, K]
        assignment.append(dist.argmin(1).cpu())
    return runtime.gather_rows(torch.cat(assignment) if assignment else None)


@torch.no_grad()
def intra_cluster_lpips(model, generated, assignment, n_clusters, device, cluster_size=50, seed=0, batch=32, size=256):
    """Per-cluster mean pairwise LPIPS over at most `cluster_size` members (seeded choice, as the official
    random.shuffle + first 50). Returns (mean, std over clusters with >= 2 members, per-cluster values with
    NaN for clusters with fewer than 2 members, member counts). Under torchrun each process computes a contiguous
    share of the clusters (every process draws every cluster's shuffle, in order) and the values are gathered."""
    rng = random.Random(seed)
    mine = runtime.shard(n_clusters)
    per_cluster = []
    counts = []
    for k in tqdm(range(n_clusters), desc="IC-LPIPS clusters", disable=not runtime.is_main(), leave=False):
        members = (assignment == k).nonzero().squeeze(1).tolist()
        counts.append(len(members))
        rng.shuffle(members)
        members = members[:cluster_size]
        if k not in mine:
            continue
        if len(members) < 2:
            per_cluster.append(float("nan"))
            continue
        feats = lpips_features(model, _lpips_input(generated[members], size).to(device))
        pairs = torch.triu_indices(len(members), len(members), offset=1)  # [2, P], every i < j
        dists = []
        for start in range(0, pairs.shape[1], batch):
            i, j = pairs[0, start : start + batch], pairs[1, start : start + batch]
            dists.append(lpips_from_features(model, [f[i] for f in feats], [f[j] for f in feats]))
        per_cluster.append(torch.cat(dists).mean().item())
    per_cluster = runtime.gather_rows(torch.tensor(per_cluster, dtype=torch.float64)).tolist()
    valid = [v for v in per_cluster if not math.isnan(v)]
    mean = float(np.mean(valid)) if valid else float("nan")
    std = float(np.std(valid)) if valid else float("nan")
    return mean, std, per_cluster, counts


# ------------------------------------------------------------------------------------------------
# Pictures


def source_mean_latent(source, truncation, device, n=4096):
    if truncation >= 1:
        return None
    with torch.no_grad():
        return source.mean_latent(n)  # [1, D], shared by every model


def correspondence_grid(models, z, truncation, w_avg, noise):
    """uint8 image: one row per model (source first), the same z in each column."""
    rows = [generate(g, z, len(z), truncation, w_avg, noise) for g in models]
    images = torch.cat(rows).float() / 127.5 - 1
    return runtime.image_grid(images, nrow=len(z))


def interpolation_frames(source, adapted, keyframes, steps, truncation, w_avg, noise):
    """Frames (uint8 [3, H, 2W]) along straight lines in Z between consecutive keyframes (cyclic)."""
    frames = []
    for k in range(len(keyframes)):
        a, b = keyframes[k], keyframes[(k + 1) % len(keyframes)]
        alphas = torch.arange(steps, device=a.device, dtype=a.dtype)[:, None] / steps  # [S, 1]
        z = a[None] + alphas * (b - a)[None]  # [S, D]
        left = generate(source, z, steps, truncation, w_avg, noise)
        right = generate(adapted, z, steps, truncation, w_avg, noise)
        frames.extend(torch.cat([left, right], 3).unbind(0))
    return frames


def write_png(path, image):
    """uint8 image [3, H, W] as a PNG, atomically."""
    from PIL import Image

    write_atomically(path, lambda f: Image.fromarray(image.permute(1, 2, 0).numpy()).save(f, format="PNG"))


def save_gif(path, frames, duration_ms=100):
    from PIL import Image

    images = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    write_atomically(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                    duration=duration_ms, loop=0))


@contextlib.contextmanager
def interrupt_says(finished):
    """A Ctrl-C inside the block ends the command with `interrupted: <finished()>` (main prints it), e.g. how many
    files were written."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(finished()) from None


# ------------------------------------------------------------------------------------------------
# Density and coverage (Naeem et al. 2020)


def density_coverage(real_features, fake_features, k=5):
    """Density and coverage of fake features [M, F] against real features [N, F] (arrays or tensors):
        r_i      = distance from real X_i to its k-th nearest other real sample
        density  = 1 / (k M) sum_j sum_i 1[ |Y_j - X_i| < r_i ]
        coverage = 1 / N sum_i 1[ min_j |Y_j - X_i| < r_i ]
    Returns (density, coverage)."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)  # [N, F]
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)  # [M, F]
    if len(real) <= k:
        raise UserError(f"density and coverage with k = {k} need more than {k} real images, got {len(real)}")
    # the (k + 1)-th smallest distance of each row: the first is the sample itself
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # [N]
    inside = torch.cdist(real, fake) < radii[:, None]  # [N, M], Y_j in the ball of X_i
    density = inside.sum().item() / (k * len(fake))
    coverage = inside.any(1).double().mean().item()
    return density, coverage


# ------------------------------------------------------------------------------------------------
# Pairs: the same z and noise through two generators


@torch.no_grad()
def paired_samples(g_a, g_b, n, batch, seed, device):
    """uint8 images [N, 3, H, W] of g_a and of g_b for the same z and the same per-sample noise maps (seeded)."""
    if (g_a.size, g_a.style_dim) != (g_b.size, g_b.style_dim):
        raise UserError(f"the two generators differ: {g_a.size} px / style dim {g_a.style_dim} against "
                        f"{g_b.size} px / style dim {g_b.style_dim}")
    z = latents(n, g_a.style_dim, seed, device)  # [N, D]
    noise_rng = torch.Generator().manual_seed(seed + 1)
    shapes = [getattr(g_a.noises, f"noise_{k}").shape[-2:] for k in range(g_a.num_layers)]
    images_a, images_b = [], []
    for start in tqdm(range(0, n, batch), desc="generating pairs", leave=False):
        chunk = z[start : start + batch]
        noise = [torch.randn(len(chunk), 1, *shape, generator=noise_rng).to(device) for shape in shapes]  # [b, 1, r, r]
        images_a.append(generate(g_a, chunk, batch, noise=noise))
        images_b.append(generate(g_b, chunk, batch, noise=noise))
    return torch.cat(images_a), torch.cat(images_b)


class IdentityNet(torch.nn.Module):
    """ArcFace IR-SE50 (model_ir_se50.pth of TreB1eN/InsightFace_Pytorch, the identity network of pSp's and e4e's
    ID loss): input conv, the IR-SE body, then BN, flatten, linear 512 x 7 x 7 -> 512, BN; unit-length output."""

    def __init__(self):
        from torch import nn

        blocks = pretrained_module().BottleneckIRSE
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        body, cin = [], 64
        for width, units in zip((64, 128, 256, 512), (3, 4, 14, 3)):
            for k in range(units):
                body.append(blocks(cin, width, 2 if k == 0 else 1))
                cin = width
        self.body = nn.Sequential(*body)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(), nn.Linear(512 * 7 * 7, 512),
                                          nn.BatchNorm1d(512))

    def forward(self, x):  # x: [B, 3, 112, 112] in [-1, 1]
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)  # [B, 512]


def identity_input(images):
    """uint8 [N, 3, H, W] -> the ID loss's input: [-1, 1], pooled to 256 px, the face box rows 35:223, columns
    32:220 of an FFHQ-aligned face, pooled to 112 px: [N, 3, 112, 112]."""
    x = F.adaptive_avg_pool2d(images.float() / 127.5 - 1, (256, 256))  # [N, 3, 256, 256]
    return F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))  # [N, 3, 112, 112]


def load_identity_network(path, device):
    if not os.path.isfile(path):
        raise UserError(f"identity network not found: {path} (ArcFace IR-SE50 model_ir_se50.pth, as pSp / e4e use it)")
    state = read_checkpoint(path)
    net = IdentityNet()
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not an ArcFace IR-SE50 state dict ({str(error).strip().splitlines()[0][:160]})") from None
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def embeddings(images, batch, device, identity_net=None, inception=None):
    """Features [N, F] (float64 numpy) of uint8 images: the identity network's when given, else Inception pool3."""
    if identity_net is None:
        return inception_features(inception, list(images), batch, device, desc="pool3 features")
    chunks = [identity_net(identity_input(images[k : k + batch]).to(device)).cpu().double()
              for k in range(0, len(images), batch)]
    return torch.cat(chunks).numpy()


@torch.no_grad()
def pair_metrics(images_a, images_b, lpips_model, batch, device, identity_net=None, inception=None):
    """Means over pairs of LPIPS-VGG (at the images' own size), MSE (images in [-1, 1]) and the cosine similarity
    of the embeddings: {"pair_lpips", "pair_mse", "pair_cosine"}."""
    size = images_a.shape[-1]
    lpips_values = []
    for start in range(0, len(images_a), batch):
        feats_a = lpips_features(lpips_model, _lpips_input(images_a[start : start + batch], size).to(device))
        feats_b = lpips_features(lpips_model, _lpips_input(images_b[start : start + batch], size).to(device))
        lpips_values.append(lpips_from_features(lpips_model, feats_a, feats_b).cpu())
    x_a, x_b = images_a.float() / 127.5 - 1, images_b.float() / 127.5 - 1  # [N, 3, H, W]
    # mean_pixels (a - b)^2 per pair
    mse = (x_a - x_b).square().flatten(1).mean(1)  # [N]
    e_a = embeddings(images_a, batch, device, identity_net, inception)  # [N, F]
    e_b = embeddings(images_b, batch, device, identity_net, inception)  # [N, F]
    unit_a = e_a / np.maximum(np.linalg.norm(e_a, axis=1, keepdims=True), 1e-30)  # [N, F]
    unit_b = e_b / np.maximum(np.linalg.norm(e_b, axis=1, keepdims=True), 1e-30)  # [N, F]
    cosine = (unit_a * unit_b).sum(1)  # [N], cos(e_a, e_b) per pair
    return {"pair_lpips": torch.cat(lpips_values).mean().item(), "pair_mse": mse.mean().item(),
            "pair_cosine": float(cosine.mean())}


def feature_network(args, device, command, inception=None):
    """(identity network or None, Inception or None, its name for the output) for pair metrics; `inception`:
    the --dims Inception when already loaded."""
    if args.identity:
        return load_identity_network(args.identity, device), None, f"ArcFace identity features of {args.identity}"
    name = "Inception pool3 features" if args.dims == 2048 else f"Inception {args.dims}-d features (--dims)"
    return None, inception or load_fid_inception(device, args.random_weights, args.dims, command=command), name


# ------------------------------------------------------------------------------------------------
# Real images: inversion, translation and editing


def pretrained_module():
    """pretrained.py (the e4e encoder and its IR-SE blocks), imported when first needed."""
    import pretrained
    return pretrained


def load_source(path, device):
    """The source's g_ema as a plain generator (no RSSA compression): the space photos are inverted into."""
    return load_checkpoint(path, require=("g_ema",), device=device)[0]["g_ema"]


def read_photos(folder, size):
    """(file names, uint8 images [N, 3, size, size]): every image of the folder resized (shorter side) and
    centre-cropped as the training images are (common.load_image), small ones upscaled."""
    try:
        files = common.list_images(folder)
    except UserError as error:
        raise UserError(f"--images: {error}") from None
    images = torch.stack([common.load_image(f, size, allow_upscale=True) for f in files])  # [N, 3, S, S]
    return [os.path.basename(f) for f in files], images


def model_names(paths, names=None):
    """A name per checkpoint: --names, else the run folder of <run>/checkpoints/x.pt, else the file name."""
    if names is None:
        names = [os.path.basename(runtime.checkpoint_run_folder(p) or os.path.splitext(p)[0]) for p in paths]
    if len(names) != len(paths):
        raise UserError(f"--names gives {len(names)} names for {len(paths)} checkpoints")
    if len(set(names)) != len(names) or "source" in names:
        raise UserError(f"the checkpoints' names {', '.join(names)} are not distinct (or one is 'source'); give --names")
    return names


@torch.no_grad()
def render_codes(g, codes, noise):
    """uint8 images [N, 3, H, W] of W+ codes [N, n_latent, D] through g, one code per call (so a code renders the
    same pixels in every picture); an RSSA generator (rssa.CompressedGenerator) renders P(w), as it samples."""
    from rssa import CompressedGenerator, compress_latents

    images = []
    for code in codes:
        w = code[None]  # [1, L, D]
        if isinstance(g, CompressedGenerator):
            w = compress_latents(w, g.projectors, g.blend)  # [1, L, D], P in W+
        image, _ = g([w], input_is_latent=True, noise=noise)  # [1, 3, H, W]
        images.append(to_uint8(image).cpu())
    return torch.cat(images)


def fixed_noise(g):
    """g's fixed noise buffers: the noise the inversion used, given to every generator."""
    return [getattr(g.noises, f"noise_{k}") for k in range(g.num_layers)]


@torch.no_grad()
def photo_lpips(lpips_model, renders, photos, device):
    """LPIPS [N] between uint8 renders and uint8 photos, at their own size."""
    return lpips_model(renders.to(device).float() / 127.5 - 1, photos.to(device).float() / 127.5 - 1).flatten().cpu()


@torch.no_grad()
def encode_e4e(path, source, photos, batch, device):
    """W+ codes [N, n_latent, D] of uint8 photos by an e4e encoder, which must encode into the source's W+."""
    pretrained = pretrained_module()
    encoder = pretrained.load_e4e(path).to(device)
    if tuple(encoder.latent_avg.shape) != (source.n_latent, source.style_dim):
        raise UserError(f"{path} encodes into W+ of {tuple(encoder.latent_avg.shape)} codes, the source's W+ is "
                        f"{(source.n_latent, source.style_dim)}: an e4e encoder fits only the generator it was trained for")
    codes = []
    for start in tqdm(range(0, len(photos), batch), desc="e4e", leave=False):
        x = photos[start : start + batch].to(device).float() / 127.5 - 1  # [b, 3, S, S]
        codes.append(encoder(pretrained.e4e_input(x, encoder.size)))  # [b, L, D]
    return torch.cat(codes)


def invert_photos(args, source, photos, device):
    """W+ codes [N, n_latent, D] of uint8 photos [N, 3, S, S]: e4e with --e4e, else RSSA's optimisation in
    chunks of --batch from one w_avg (the per-image problems are independent: the chunking changes nothing)."""
    if args.e4e:
        return encode_e4e(args.e4e, source, photos, args.batch, device)
    lpips_model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    w_avg = common.mean_w(source)  # [D]
    codes = []
    for start in range(0, len(photos), args.batch):
        x = photos[start : start + args.batch].to(device).float() / 127.5 - 1  # [b, 3, S, S]
        chunk_codes, _ = common.invert_wplus(source, x, lpips_model, args.steps, args.lr, w_avg)  # [b, L, D]
        codes.append(chunk_codes)
    return torch.cat(codes)


def read_codes(path, names, source):
    """The codes [N, n_latent, D] of the photos `names` from an `invert` codes file."""
    if not os.path.isfile(path):
        raise UserError(f"--codes file not found: {path}")
    stored = read_checkpoint(path)
    if not isinstance(stored, dict) or not all(torch.is_tensor(v) for v in stored.values()):
        raise UserError(f"{path} is not a codes file of `evaluate.py invert` (a dict: image file name -> W+ code)")
    missing = [n for n in names if n not in stored]
    if missing:
        raise UserError(f"{path} has no code for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                        "run `evaluate.py invert` on this --images folder")
    codes = torch.stack([stored[n].float() for n in names])  # [N, L, D]
    if codes.shape[1:] != (source.n_latent, source.style_dim):
        raise UserError(f"{path} holds codes of shape {tuple(codes.shape[1:])}; the source's W+ is "
                        f"{(source.n_latent, source.style_dim)}")
    return codes


def photo_codes(args, source, names, photos, device):
    """--codes when given, else the inversion, written to <out>/codes.pt for reuse."""
    if args.codes:
        return read_codes(args.codes, names, source).to(device)
    codes = invert_photos(args, source, photos, device)
    save_codes(os.path.join(args.out, "codes.pt"), names, codes)
    return codes


def save_codes(path, names, codes):
    runtime.save_checkpoint(path, {name: code.cpu() for name, code in zip(names, codes)})
    print(f"wrote {path} ({len(names)} W+ codes)")


def save_strip(path, images, nrow):
    """uint8 images [N, 3, H, W] as a grid of nrow columns."""
    write_png(path, runtime.image_grid(images.float() / 127.5 - 1, nrow))


# The StyleGAN paper's coarse / middle / fine styles: 4^2-8^2, 16^2-32^2, 64^2 and up, two W+ slots per
# resolution (GANSpace's and InterFaceGAN's usual 0-3 / 4-7 / 8-)
LAYER_RANGES = {"coarse": (0, 4), "middle": (4, 8), "fine": (8, None)}


def parse_layers(spec, n_latent):
    """--layers: all, coarse, middle, fine, or W+ slots as comma-separated numbers and ranges (0-3,5) -> sorted slots."""
    if spec == "all":
        return list(range(n_latent))
    if spec in LAYER_RANGES:
        start, stop = LAYER_RANGES[spec]
        slots = list(range(start, n_latent if stop is None else min(stop, n_latent)))
        if not slots:
            raise UserError(f"--layers {spec}: this generator's W+ has {n_latent} slots, none of them {spec} (slots {start}-)")
        return slots
    slots = set()
    for item in spec.split(","):
        bounds = item.split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise UserError(f"--layers {spec}: use all, coarse, middle, fine or slots like 0-3,5")
        first, last = int(bounds[0]), int(bounds[-1])
        if not 0 <= first <= last < n_latent:
            raise UserError(f"--layers {spec}: slots must lie in 0-{n_latent - 1} (this generator's W+)")
        slots.update(range(first, last + 1))
    return sorted(slots)


def ganspace_components(source, path, n_samples, device, cache_dir=CACHE_DIR, seed=0):
    """GANSpace (Härkönen et al. 2020) directions of the source's W: the principal axes of n_samples mapped
    z ~ N(0, I), cached by checkpoint and sample count. Returns (components [D, D], one unit vector per row by
    decreasing variance, sign: largest entry positive; standard deviations along them [D])."""
    stat = os.stat(path)
    key = hashlib.sha1(f"ganspace|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{n_samples}|{seed}".encode())
    cache = os.path.join(cache_dir, f"ganspace_{key.hexdigest()[:16]}.pt")
    if os.path.exists(cache):
        stored = torch.load(cache, weights_only=True)
        return stored["components"].to(device), stored["stdevs"].to(device)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.cat([source.style(torch.randn(min(10000, n_samples - k), source.style_dim, generator=rng).to(device)).double()
                       for k in tqdm(range(0, n_samples, 10000), desc="GANSpace samples", leave=False)])  # [N, D]
    centred = w - w.mean(0)  # [N, D]
    variances, axes = torch.linalg.eigh(centred.T @ centred / (len(w) - 1))  # ascending, axes as columns [D, D]
    components = axes.flip(1).T  # [D, D], rows by decreasing variance
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))  # [D, 1]
    components = (components * largest.sign()).float()  # [D, D]
    stdevs = variances.flip(0).clamp_min(0).sqrt().float()  # [D]
    os.makedirs(cache_dir, exist_ok=True)
    runtime.save_checkpoint(cache, {"components": components.cpu(), "stdevs": stdevs.cpu()})
    return components, stdevs


def edit_direction(spec, source, args, device):
    """The edit direction [n_latent, D] and its unit: pcK, the source's K-th GANSpace component times its
    standard deviation (strength in standard deviations), or a file (.npy / .pt) of shape [D], [1, D] or
    [n_latent, D], taken as it is (InterFaceGAN boundaries are unit normals)."""
    n_latent, dim = source.n_latent, source.style_dim
    component = re.fullmatch(r"pc(\d+)", spec)
    if component:
        k = int(component.group(1))
        if k >= dim:
            raise UserError(f"--direction {spec}: W has {dim} principal components (pc0-pc{dim - 1})")
        components, stdevs = ganspace_components(source, args.source, args.pca_samples, device, args.cache_dir)
        return (stdevs[k] * components[k]).expand(n_latent, dim), f"standard deviations along GANSpace pc{k}"
    if not os.path.isfile(spec):
        raise UserError(f"direction file not found: {spec} (a .npy or .pt boundary, or pc0, pc1, ... for GANSpace)")
    if spec.endswith(".npy"):
        try:
            direction = torch.from_numpy(np.load(spec, allow_pickle=False)).float()
        except (ValueError, OSError) as error:
            raise UserError(f"cannot read direction {spec}: {str(error).splitlines()[0]}") from None
    elif spec.endswith(".pt"):
        direction = read_checkpoint(spec)
        if not torch.is_tensor(direction):
            raise UserError(f"{spec} holds a {type(direction).__name__}, not a direction tensor")
        direction = direction.float()
    else:
        raise UserError(f"direction {spec}: use a .npy or .pt file, or pc0, pc1, ... for GANSpace")
    if tuple(direction.shape) in ((dim,), (1, dim)):
        return direction.reshape(1, dim).expand(n_latent, dim).to(device), f"units of {os.path.basename(spec)}"
    if tuple(direction.shape) == (n_latent, dim):
        return direction.to(device), f"units of {os.path.basename(spec)}"
    raise UserError(f"direction {spec} has shape {tuple(direction.shape)}; this source needs [{dim}], [1, {dim}] "
                    f"or [{n_latent}, {dim}]")


def edited_codes(code, direction, strengths, slots):
    """code [L, D] moved by strength * direction on the W+ slots `slots` only: [S, L, D] for S strengths."""
    mask = torch.zeros(code.shape[0], 1, device=code.device)  # [L, 1]
    mask[slots] = 1
    step = mask * direction  # [L, D]
    s = torch.tensor(strengths, device=code.device, dtype=code.dtype)[:, None, None]  # [S, 1, 1]
    # w' = w + s d on the chosen slots (s = 0: w itself, bit for bit)
    return code[None] + s * step[None]  # [S, L, D]


# ------------------------------------------------------------------------------------------------
# Command line


def latents(n, dim, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator).to(device)  # [N, D], the same on every device


def metrics_for(path, args, device, real_stats=None, fid_model=None, lpips_model=None, centers=None, is_model=None,
                real_feats=None, pairing=None):
    """The metrics asked for in args, for one checkpoint; returns a dict. real_feats: the real images' pool3
    features (density and coverage); pairing: (reference generator, LPIPS model, identity network or None,
    Inception or None) for the pair columns."""
    g = load_generator(path, device)
    z = latents(args.n, g.style_dim, args.seed, device)
    generated = generate(g, z, args.batch, progress=f"generating ({os.path.basename(path)})")  # every image (IC-LPIPS, IS, pairs)
    result = {}
    if fid_model is not None:
        feats = inception_features(fid_model, list(generated), args.batch, device, desc="fid features")
        mu, sigma = feature_statistics(feats)
        result["fid"] = frechet_distance(mu, sigma, real_stats[0], real_stats[1])
        if real_feats is not None:
            result["density"], result["coverage"] = density_coverage(real_feats, feats, args.k)
    if pairing is not None:
        reference, pair_lpips, identity_net, inception = pairing
        images, reference_images = paired_samples(g, reference, args.n, args.batch, args.seed, device)
        result.update(pair_metrics(images, reference_images, pair_lpips, args.batch, device, identity_net, inception))
    if lpips_model is not None:
        n_lpips = min(args.n_lpips, len(generated))
        assignment = assign_clusters(lpips_model, generated[:n_lpips], centers, args.batch, device)
        mean, std, _, counts = intra_cluster_lpips(lpips_model, generated[:n_lpips], assignment, len(centers), device,
                                                   args.cluster_size, args.seed)
        result.update(ic_lpips=mean, ic_lpips_std=std, small_clusters=sum(c < 2 for c in counts))
    if is_model is not None:
        probs = inception_probabilities(is_model, list(generated), args.batch, device, args.resize)
        result["is"], result["is_std"] = inception_score(probs, args.splits)
    return result


def cmd_fid(args, device):
    for folder in filter(None, (args.real, args.fake)):
        common.list_images(folder)  # a missing or empty folder says so before the network is built
    model = load_fid_inception(device, args.random_weights, args.dims)
    tag = f"{'random' if args.random_weights else 'pretrained'}-{args.dims}"
    mu_r, sigma_r, n_real = real_statistics(args.real, model, args.batch, device, args.cache_dir, tag)
    if args.fake:
        _, images = read_folder(args.fake)
        source = args.fake
        feats = inception_features(model, images, args.batch, device, desc="fid features")
    else:
        g = load_generator(args.ckpt, device)
        # each chunk's pool3 features as it is generated: no more than a chunk of images is held (5000+ samples)
        feats = generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating",
                         features=lambda images: inception_batch(model, images, device)).numpy()
        source = f"{len(feats)} samples of {args.ckpt}"
    mu_f, sigma_f = feature_statistics(feats)
    fid = frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
    print(f"FID{random_label(args, 'Inception')} {fid:.4f}  ({source} vs {n_real} real images in {args.real})")
    if n_real < 1000:
        print(f"note: {n_real} real images; FID is biased upwards for small sets (the papers use 5000 generated images)")
    return fid


def real_and_generated_features(args, device, command):
    """Inception features of the --real folder and of --n samples of --ckpt (KID, density / coverage):
    (real features [R, F], generated features [N, F])."""
    common.list_images(args.real)  # a missing or empty folder says so before the network is built
    model = load_fid_inception(device, args.random_weights, args.dims, command=command)
    _, real = read_folder(args.real)
    feats_real = inception_features(model, real, args.batch, device, desc="real features")
    g = load_generator(args.ckpt, device)
    feats_fake = generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating",
                          features=lambda images: inception_batch(model, images, device)).numpy()
    return feats_real, feats_fake


def cmd_kid(args, device):
    feats_real, feats_fake = real_and_generated_features(args, device, "kid")
    mean, std = kernel_inception_distance(feats_real, feats_fake, args.subsets, args.subset_size, args.seed)
    print(f"KID{random_label(args, 'Inception')} {mean:.6f} +- {std:.6f}  ({len(feats_fake)} samples vs {len(feats_real)} real images)")
    return mean, std


def cmd_is(args, device):
    model = load_is_inception(device, args.random_weights)
    g = load_generator(args.ckpt, device)
    images = list(generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating"))
    mean, std = inception_score(inception_probabilities(model, images, args.batch, device, args.resize), args.splits)
    print(f"IS{random_label(args, 'Inception')} {mean:.4f} +- {std:.4f}  ({len(images)} samples, {args.splits} splits, "
          f"{'299 px' if args.resize else 'native size'})")
    return mean, std


def cmd_iclpips(args, device):
    model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    g = load_generator(args.ckpt, device)
    centers = common.ImageFolder(args.train, g.size).images
    generated = generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating")
    assignment = assign_clusters(model, generated, centers, args.batch, device)
    mean, std, per_cluster, counts = intra_cluster_lpips(model, generated, assignment, len(centers), device,
                                                         args.cluster_size, args.seed)
    small = sum(c < 2 for c in counts)
    print(f"IC-LPIPS{random_label(args, 'VGG')} {mean:.4f} +- {std:.4f}  ({len(generated)} samples, {len(centers)} clusters, "
          f"{small} with fewer than 2 members, excluded)")
    print(f"cluster sizes{random_label(args, 'VGG')}: " + " ".join(str(c) for c in counts))
    return mean, std, counts


def cmd_compare(args, device):
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.ckpt]
    if len(names) != len(args.ckpt):
        raise UserError(f"--names gives {len(names)} names for {len(args.ckpt)} checkpoints")
    fid_model = real = lpips_model = centers = is_model = real_feats = pairing = None
    if args.real:
        fid_model = load_fid_inception(device, args.random_weights, args.dims, command="compare (FID column)")
        tag = f"{'random' if args.random_weights else 'pretrained'}-{args.dims}"
        real = real_statistics(args.real, fid_model, args.batch, device, args.cache_dir, tag)
        if args.density_coverage:
            real_feats = inception_features(fid_model, read_folder(args.real)[1], args.batch, device, desc="real features")
    if args.train or args.pair_with:
        lpips_model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    if args.pair_with:
        identity_net, inception, feature_name = feature_network(args, device, "compare (pair columns)", fid_model)
        pairing = (load_generator(args.pair_with, device), lpips_model, identity_net, inception)
        print(f"pair columns: each checkpoint against {args.pair_with}, {args.n} pairs of the same z and noise; "
              f"cosine of the {feature_name}")
    if not args.no_is:
        is_model = load_is_inception(device, args.random_weights, command="compare (IS column, --no-is to skip it)")
    rows = []
    for name, path in zip(names, args.ckpt):
        if args.train:
            centers = common.ImageFolder(args.train, load_generator(path, "cpu").size).images
        rows.append({"method": name, **metrics_for(path, args, device, real, fid_model, lpips_model if args.train else None,
                                                   centers, is_model, real_feats, pairing)})
    labels = random_columns(args)
    print(markdown_table(rows, labels))
    if runtime.is_main():
        with open(args.csv, "w", newline="") as f:
            named = [{k + labels.get(k, ""): v for k, v in row.items()} for row in rows]
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in named for k in row)))
            writer.writeheader()
            writer.writerows(named)
    print(f"wrote {args.csv}")
    return rows


# compare's columns: (result key, header, cell text), in table order
TABLE_COLUMNS = (
    ("fid", "FID", lambda r: f"{r['fid']:.2f}"),
    ("ic_lpips", "IC-LPIPS", lambda r: f"{r['ic_lpips']:.4f} ± {r['ic_lpips_std']:.4f}"),
    ("is", "IS", lambda r: f"{r['is']:.3f} ± {r['is_std']:.3f}"),
    ("density", "density", lambda r: f"{r['density']:.3f}"),
    ("coverage", "coverage", lambda r: f"{r['coverage']:.3f}"),
    ("pair_lpips", "pair LPIPS", lambda r: f"{r['pair_lpips']:.4f}"),
    ("pair_mse", "pair MSE", lambda r: f"{r['pair_mse']:.5f}"),
    ("pair_cosine", "pair cosine", lambda r: f"{r['pair_cosine']:.4f}"),
)


def random_columns(args):
    """{result key: ' (random Inception)' or ' (random VGG)'} for compare's numbers computed by a network that
    --random-weights randomised; {} without it."""
    if not args.random_weights:
        return {}
    networks = {**dict.fromkeys(("fid", "density", "coverage", "is", "is_std"), "Inception"),
                **dict.fromkeys(("ic_lpips", "ic_lpips_std", "small_clusters", "pair_lpips"), "VGG")}
    if not args.identity:
        networks["pair_cosine"] = "Inception"
    return {key: f" (random {network})" for key, network in networks.items()}


def markdown_table(rows, labels=None):
    """| method | FID | IC-LPIPS | IS | ... with the columns that were computed; labels: {result key: text after its
    header} (random_columns)."""
    labels = labels or {}
    columns = [c for c in TABLE_COLUMNS if any(c[0] in r for r in rows)]
    header = ["method"] + [c[1] + labels.get(c[0], "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"]] + [cell(r) for _, _, cell in columns]) + " |")
    return "\n".join(lines)


def cmd_grid(args, device):
    source = load_generator(args.source, device)
    models = [source] + [load_generator(p, device) for p in args.ckpt]
    check_sizes(models)
    z = latents(args.n, source.style_dim, args.seed, device)
    w_avg = source_mean_latent(source, args.truncation, device)
    noise = fixed_noise(source)  # one noise for all rows
    grid = correspondence_grid(models, z, args.truncation, w_avg, noise)
    write_png(args.out, grid)
    print(f"wrote {args.out} ({len(models)} rows: source, {', '.join(args.ckpt)})")


def cmd_interpolate(args, device):
    source, adapted = load_generator(args.source, device), load_generator(args.ckpt, device)
    z = latents(args.keyframes, source.style_dim, args.seed, device)
    w_avg = source_mean_latent(source, args.truncation, device)
    noise = fixed_noise(source)
    frames = interpolation_frames(source, adapted, z, args.steps, args.truncation, w_avg, noise)
    save_gif(args.out, frames, args.duration)
    print(f"wrote {args.out} ({len(frames)} frames)")


def cmd_export(args, device):
    g = load_generator(args.ckpt, device)
    source = load_generator(args.source, device) if args.source else g
    w_avg = source_mean_latent(source, args.truncation, device)
    z = latents(args.n, g.style_dim, args.seed, device)
    os.makedirs(args.out, exist_ok=True)
    written = 0
    with interrupt_says(lambda: f"{written} of {args.n} images written to {args.out}"):
        for start in tqdm(range(0, args.n, args.batch), desc="exporting"):
            images = generate(g, z[start : start + args.batch], args.batch, args.truncation, w_avg)
            for image in images:
                write_png(os.path.join(args.out, f"{written:06d}.png"), image)
                written += 1
    print(f"wrote {args.n} images to {args.out}")


def cmd_density_coverage(args, device):
    feats_real, feats_fake = real_and_generated_features(args, device, "density-coverage")
    density, coverage = density_coverage(feats_real, feats_fake, args.k)
    label = random_label(args, "Inception")
    print(f"density{label} {density:.4f}  coverage{label} {coverage:.4f}  ({len(feats_fake)} samples vs {len(feats_real)} real "
          f"images, k = {args.k}, Inception features {args.dims})")
    return density, coverage


def cmd_pair(args, device):
    g_a, g_b = load_generator(args.a, device), load_generator(args.b, device)
    lpips_model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    identity_net, inception, feature_name = feature_network(args, device, "pair")
    images_a, images_b = paired_samples(g_a, g_b, args.n, args.batch, args.seed, device)
    result = pair_metrics(images_a, images_b, lpips_model, args.batch, device, identity_net, inception)
    cosine_label = "" if args.identity else random_label(args, "Inception")
    print(f"LPIPS{random_label(args, 'VGG')} {result['pair_lpips']:.4f}  MSE {result['pair_mse']:.5f}  "
          f"cosine{cosine_label} {result['pair_cosine']:.4f}  "
          f"({args.n} pairs: the same z and noise through {args.a} and {args.b}; LPIPS-VGG at their own size, MSE on [-1, 1], "
          f"cosine of the {feature_name})")
    return result


def cmd_invert(args, device):
    source = load_source(args.source, device)
    names, photos = read_photos(args.images, source.size)
    codes = invert_photos(args, source, photos, device)
    save_codes(os.path.join(args.out, "codes.pt"), names, codes)
    noise = fixed_noise(source)
    recon = render_codes(source, codes, noise)  # [N, 3, S, S] uint8
    z = latents(len(names), source.style_dim, args.seed + 1, device)  # [N, D]
    with torch.no_grad():
        random_codes = source.style(z)[:, None].expand(-1, source.n_latent, -1)  # [N, L, D]
    random_images = render_codes(source, random_codes, noise)  # [N, 3, S, S] uint8
    lpips_model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    lpips_recon = photo_lpips(lpips_model, recon, photos, device)  # [N]
    lpips_random = photo_lpips(lpips_model, random_images, photos, device)  # [N]
    path = os.path.join(args.out, "reconstruction.png")
    runtime.save_comparison_grid(path, photos.float() / 127.5 - 1, recon.float() / 127.5 - 1)
    print(f"wrote {path} (photos left, reconstructions right)")
    how = f"e4e {args.e4e}" if args.e4e else f"{args.steps} optimisation steps"
    print(f"reconstruction LPIPS{random_label(args, 'VGG')} {lpips_recon.mean():.4f} ({how}); a random code's "
          f"{lpips_random.mean():.4f} (LPIPS-VGG, mean over {len(names)} images)")
    return {"names": names, "codes": codes.cpu(), "lpips": lpips_recon, "lpips_random": lpips_random}


def cmd_translate(args, device):
    source = load_source(args.source, device)
    names = model_names(args.ckpt, args.names)
    models = [load_generator(p, device) for p in args.ckpt]
    check_sizes([source, *models])
    files, photos = read_photos(args.images, source.size)
    codes = photo_codes(args, source, files, photos, device)  # [N, L, D]
    noise = fixed_noise(source)
    rows = []  # per photo: the photo, its source reconstruction and the K adapted renders, each [3, S, S]
    with interrupt_says(lambda: f"{len(rows)} of {len(files)} photos written to {args.out}"):
        for file, photo, code in zip(files, photos, codes):
            renders = [render_codes(g, code[None], noise)[0] for g in [source, *models]]
            for name, image in zip(["source", *names], renders):
                write_png(os.path.join(args.out, f"{os.path.splitext(file)[0]}_{name}.png"), image)
            rows.append([photo, *renders])
    columns = [torch.stack(column) for column in zip(*rows)]  # each [N, 3, S, S]
    grid = torch.stack(columns, 1).flatten(0, 1)  # [N (2 + K), 3, S, S], one row per photo
    path = os.path.join(args.out, "translation.png")
    save_strip(path, grid, len(columns))
    print(f"wrote {path} (one row per photo: photo, source reconstruction, {', '.join(names)}) and one PNG per photo and model")
    return columns


def cmd_edit(args, device):
    source = load_source(args.source, device)
    names = model_names(args.ckpt, args.names)
    models = [load_generator(p, device) for p in args.ckpt]
    check_sizes([source, *models])
    direction, unit = edit_direction(args.direction, source, args, device)  # [L, D]
    slots = parse_layers(args.layers, source.n_latent)
    files, photos = read_photos(args.images, source.size)
    codes = photo_codes(args, source, files, photos, device)  # [N, L, D]
    noise = fixed_noise(source)
    strips = []
    with interrupt_says(lambda: f"{len(strips)} of {len(files)} strips written to {args.out}"):
        for file, code in zip(files, codes):
            edited = edited_codes(code, direction, args.strength, slots)  # [S, L, D]
            strip = torch.cat([render_codes(g, edited, noise) for g in [source, *models]])  # [(1 + K) S, 3, H, W]
            save_strip(os.path.join(args.out, f"{os.path.splitext(file)[0]}_edit.png"), strip, len(args.strength))
            strips.append(strip)
    print(f"wrote {len(files)} strips to {args.out} (rows: source, {', '.join(names)}; columns: strengths "
          f"{' '.join(f'{s:g}' for s in args.strength)} in {unit}; W+ slots {args.layers})")
    return strips


def check_sizes(models):
    sizes = {m.size for m in models}
    if len(sizes) > 1:
        raise UserError(f"the generators have different resolutions ({sorted(sizes)})")


def build_parser():
    """The command line: one subparser per command."""
    parser = argparse.ArgumentParser(description="Metrics and pictures for adapted generators")
    sub = parser.add_subparsers(dest="command", required=True)
    device_help = "auto, cpu or cuda (default: auto, cuda when available)"
    ckpt_help = "checkpoint whose g_ema generates --n images"

    def common_opts(p, n_default):
        p.add_argument("--n", type=int, default=n_default, help=f"generated images (default {n_default})")
        p.add_argument("--batch", type=int, default=50, help="batch size (default 50: pytorch-fid's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the latents and of every random choice (default 0)")
        p.add_argument("--device", default="auto", help=device_help)
        p.add_argument("--random-weights", action="store_true",
                       help="randomly initialised networks: tests only, numbers meaningless and labelled '(random Inception)' "
                            "or '(random VGG)' (default: pretrained)")
        p.add_argument("--cache-dir", default=CACHE_DIR, help=f"where real-set FID statistics are cached (default {CACHE_DIR})")
        p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                       help="Inception features for FID/KID (default 2048: pool3, the papers'; as pytorch-fid's --dims)")

    p = sub.add_parser("fid", help="FID against a folder of real images (pytorch-fid protocol)")
    common_opts(p, 5000)
    p.add_argument("--real", required=True, help="folder of real target images")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ckpt", help=ckpt_help)
    group.add_argument("--fake", help="or a folder of generated images")

    p = sub.add_parser("kid", help="Kernel Inception Distance against a folder of real images")
    common_opts(p, 5000)
    p.add_argument("--real", required=True, help="folder of real target images")
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--subsets", type=int, default=100, help="subsets (default 100: torch-fidelity's)")
    p.add_argument("--subset-size", type=int, default=1000, help="subset size, capped by both set sizes (default 1000)")

    p = sub.add_parser("is", help="Inception Score (10 splits)")
    common_opts(p, 5000)
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--splits", type=int, default=10, help="splits (default 10)")
    p.add_argument("--resize", action="store_true", help="resize to 299 px (default: native size, as RSSA's and the progressive paper's scripts)")

    p = sub.add_parser("iclpips", help="intra-cluster LPIPS (CDC)")
    common_opts(p, 1000)
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--train", required=True, help="folder of the training (few-shot) images: the cluster centres")
    p.add_argument("--cluster-size", type=int, default=50, help="members per cluster used (default 50: official feat_cluster.py)")

    p = sub.add_parser("density-coverage", help="density and coverage (Naeem et al. 2020) against a folder of real images")
    common_opts(p, 5000)
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--real", required=True, help="folder of real target images")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours of the real balls (default 5: Naeem et al., CDC's supplement)")

    p = sub.add_parser("pair", help="the same z and noise through two generators: LPIPS, MSE, feature cosine")
    common_opts(p, 1000)
    p.add_argument("--a", required=True, help="first checkpoint (its g_ema)")
    p.add_argument("--b", required=True, help="second checkpoint (its g_ema)")
    p.add_argument("--identity", help="ArcFace IR-SE50 weights (model_ir_se50.pth) for the cosine (default: Inception pool3 "
                                      "features, or the block --dims selects)")

    p = sub.add_parser("compare", help="several checkpoints: Markdown table + CSV")
    common_opts(p, 5000)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints, one table row each; each generates --n images")
    p.add_argument("--names", nargs="+", help="method names for the table (default: file names)")
    p.add_argument("--real", help="folder of real target images for the FID column (default: no FID)")
    p.add_argument("--train", help="folder of the training images for the IC-LPIPS column (default: no IC-LPIPS)")
    p.add_argument("--n-lpips", type=int, default=1000, help="generated images used for IC-LPIPS (default 1000: CDC)")
    p.add_argument("--cluster-size", type=int, default=50,
                   help="members per cluster used for IC-LPIPS (default 50: official feat_cluster.py)")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score (default: an IS column)")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--resize", action="store_true", help="Inception Score at 299 px (default: native size)")
    p.add_argument("--csv", default="results.csv", help="CSV output (default results.csv)")
    p.add_argument("--density-coverage", action="store_true", help="density and coverage columns against --real (default: none)")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours for density and coverage (default 5)")
    p.add_argument("--pair-with", help="checkpoint each one is paired with (same z and noise): LPIPS, MSE and cosine columns "
                                       "(default: none)")
    p.add_argument("--identity", help="ArcFace IR-SE50 weights for the pair cosine (default: Inception pool3 features, or the "
                                      "block --dims selects)")

    p = sub.add_parser("grid", help="correspondence grid: source and adapted generators, same z")
    p.add_argument("--source", required=True, help="source checkpoint: the first row, and the mean w of --truncation")
    p.add_argument("--ckpt", nargs="+", required=True, help="adapted checkpoints, one row each")
    p.add_argument("--n", type=int, default=8, help="columns (default 8)")
    p.add_argument("--truncation", type=float, default=1.0, help="psi, around the source's mean w (default 1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the columns' z (default 0)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")

    p = sub.add_parser("interpolate", help="GIF of straight lines in Z, source | adapted")
    p.add_argument("--source", required=True, help="source checkpoint: the frames' left half, and the mean w of --truncation")
    p.add_argument("--ckpt", required=True, help="adapted checkpoint: the frames' right half")
    p.add_argument("--keyframes", type=int, default=5, help="fixed z visited in a loop (default 5)")
    p.add_argument("--steps", type=int, default=40, help="frames between keyframes (default 40: CDC's generate.py)")
    p.add_argument("--duration", type=int, default=100, help="ms per frame (default 100)")
    p.add_argument("--truncation", type=float, default=1.0, help="psi, around the source's mean w (default 1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keyframes' z (default 0)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--out", default="interpolation.gif", help="output GIF (default interpolation.gif)")

    p = sub.add_parser("export", help="write N generated images as PNGs")
    p.add_argument("--ckpt", required=True, help="checkpoint whose g_ema generates the images")
    p.add_argument("--source", help="source checkpoint for the truncation mean (default: the checkpoint itself)")
    p.add_argument("--n", type=int, default=5000, help="images (default 5000)")
    p.add_argument("--batch", type=int, default=50, help="batch size (default 50)")
    p.add_argument("--truncation", type=float, default=1.0, help="psi, around the mean w (default 1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and the noise (default 0)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--out", required=True, help="output folder (000000.png, 000001.png, ...)")

    def photo_opts(p, out):
        p.add_argument("--source", required=True, help="source checkpoint: the photos are inverted into its W+")
        p.add_argument("--images", required=True, help="folder of photos (any size and format: shorter side resized, centre crop; "
                                                       "faces FFHQ-aligned)")
        p.add_argument("--out", default=out, help=f"output folder (default {out})")
        p.add_argument("--steps", type=int, default=4001, help="optimisation steps (default 4001: RSSA's inversion)")
        p.add_argument("--lr", type=float, default=0.1, help="Adam lr, halved every 1000 steps (default 0.1: RSSA's inversion)")
        p.add_argument("--e4e", help="invert with this e4e encoder (e4e_ffhq_encode.pt) instead of optimisation "
                                     "(default: RSSA's optimisation, --steps and --lr)")
        p.add_argument("--batch", type=int, default=8, help="photos inverted together (default 8)")
        p.add_argument("--seed", type=int, default=0, help="seed of the inversion's start (the source's mean w) and of "
                                                           "invert's random comparison codes (default 0)")
        p.add_argument("--device", default="auto", help=device_help)
        p.add_argument("--random-weights", action="store_true",
                       help="LPIPS with a random VGG: tests only, its numbers labelled '(random VGG)' (default: pretrained)")

    def adapted_opts(p):
        p.add_argument("--ckpt", nargs="+", required=True, help="adapted checkpoints")
        p.add_argument("--names", nargs="+", help="their names in file names and output (default: run folder or file name)")
        p.add_argument("--codes", help="codes.pt of `invert` for these photos (default: invert them, into <out>/codes.pt)")

    p = sub.add_parser("invert", help="W+ codes of photos under the source (RSSA's optimisation or e4e)")
    photo_opts(p, "inversion")

    p = sub.add_parser("translate", help="photos through the source's inversion into adapted generators")
    photo_opts(p, "translation")
    adapted_opts(p)

    p = sub.add_parser("edit", help="latent edits of photos, rendered by the source and adapted generators")
    photo_opts(p, "edits")
    adapted_opts(p)
    p.add_argument("--direction", required=True,
                   help="pcK: the source's K-th GANSpace component (strength in standard deviations), or a .npy / .pt "
                        "direction of shape [D], [1, D] or [n_latent, D] (InterFaceGAN boundary; strength in its units)")
    p.add_argument("--strength", type=float, nargs="+", default=[-3, -1.5, 0, 1.5, 3], help="strengths, one column each (default -3 -1.5 0 1.5 3)")
    p.add_argument("--layers", default="all", help="W+ slots that move: all (default), coarse (0-3), middle (4-7), fine (8-) or e.g. 0-3,5")
    p.add_argument("--pca-samples", type=int, default=100000, help="mapped samples for GANSpace (default 100000; cached)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help=f"where GANSpace components are cached (default {CACHE_DIR})")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("n", "batch", "steps", "keyframes", "splits", "subsets", "subset_size", "cluster_size", "n_lpips", "k",
                 "pca_samples"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "truncation", 1.0) <= 0:
        raise UserError("--truncation must be positive")
    if getattr(args, "lr", 1.0) <= 0:
        raise UserError("--lr must be positive")
    if getattr(args, "density_coverage", False) and not args.real:
        raise UserError("--density-coverage needs --real (the real images' features)")
    return args


# the commands that shard their sampling and features under torchrun; the others write pictures or codes, in one process
SHARDED_COMMANDS = ("fid", "kid", "is", "iclpips", "density-coverage", "pair", "compare")


def main(argv=None):
    """Runs one subcommand. A Ctrl-C: one line `interrupted[: what was finished]` on stderr and SystemExit(130); the
    files written until then stay."""
    args = parse_args(argv)
    if runtime.world_size() > 1 and args.command not in SHARDED_COMMANDS:
        raise UserError(f"evaluate.py {args.command} runs in one process (python evaluate.py ...); under torchrun: {', '.join(SHARDED_COMMANDS)}")
    handlers = {"fid": cmd_fid, "kid": cmd_kid, "is": cmd_is, "iclpips": cmd_iclpips, "compare": cmd_compare,
                "grid": cmd_grid, "interpolate": cmd_interpolate, "export": cmd_export, "pair": cmd_pair,
                "density-coverage": cmd_density_coverage, "invert": cmd_invert, "translate": cmd_translate, "edit": cmd_edit}
    try:
        device = runtime.init_device(args.device)
        torch.manual_seed(getattr(args, "seed", 0))
        return handlers[args.command](args, device)
    except KeyboardInterrupt as interrupt:
        for bar in list(tqdm._instances):  # an open progress bar ends its line first
            bar.close()
        if runtime.is_main():
            print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    runtime.run_main(main)
