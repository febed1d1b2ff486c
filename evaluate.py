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
    compare    Several checkpoints against the same real / training sets: a Markdown table and a CSV.
Pictures
    grid        the same z through the source and each adapted generator, one row per model (the papers' figure)
    interpolate linear paths in Z between fixed z as an animated GIF, source and adapted side by side
    export      N generated images as PNGs, for external tools

Generators are the `g_ema` of each checkpoint (rosinality format or ours). Truncation (< 1) uses the source
generator's mean w (4096 samples) for every model, as CDC's generate.py. Generated images are quantised to
8 bits exactly as a saved PNG would be before any metric sees them.

Pretrained weights come the standard way (torch hub cache: pytorch-fid's `pt_inception-2015-12-05-*.pth`,
torchvision's Inception-v3 and VGG16); when missing and not downloadable the command stops with one line
saying which file to put where. `--random-weights` builds the same networks randomly initialised, for tests only.
"""

import argparse
import csv
import hashlib
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError
from stylegan2 import load_checkpoint

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fewshot-gan-adaptation")


# ------------------------------------------------------------------------------------------------
# Networks with pretrained weights


def _weights_error(what, filename, error):
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"{what} needs the pretrained file {filename} in {cache} and it could not be downloaded "
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


def load_fid_inception(device, random_weights=False, dims=2048):
    """pytorch-fid's InceptionV3 returning the 2048-d pool3 features (as `python -m pytorch_fid` builds it);
    dims 64 / 192 / 768 select an earlier block, as pytorch-fid's --dims."""
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
        raise _weights_error("FID", os.path.basename(fid.FID_WEIGHTS_URL), error) from None
    return model.eval().requires_grad_(False).to(device)


def load_is_inception(device, random_weights=False):
    """torchvision's ImageNet Inception-v3 (1000 classes), transform_input=False, as the IS scripts use it."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = None if random_weights else Inception_V3_Weights.IMAGENET1K_V1
            model = inception_v3(weights=weights, aux_logits=True, transform_input=False, init_weights=random_weights)
    except Exception as error:
        raise _weights_error("the Inception Score", "inception_v3_google-0cc3c7bd.pth", error) from None
    return model.eval().requires_grad_(False).to(device)


# ------------------------------------------------------------------------------------------------
# Images: generated (quantised like a PNG) and read from folders


def load_generator(path, device):
    """The g_ema of a checkpoint, in eval mode; for an RSSA checkpoint that holds its target codes, g_ema behind
    RSSA's latent compression P (rssa.CompressedGenerator), since P is part of RSSA's adapted model."""
    models, raw = load_checkpoint(path, require=("g_ema",), device=device)
    if raw.get("latent_codes") is not None and raw.get("blend") is not None:
        from rssa import CompressedGenerator

        return CompressedGenerator(models["g_ema"], raw["latent_codes"].to(device), raw["blend"].to(device)).eval()
    return models["g_ema"]


def to_uint8(images):
    """[-1, 1] float -> uint8 exactly as torchvision.utils.save_image writes a PNG (clamp, x255, +0.5)."""
    return ((images.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(g, z, batch, truncation=1.0, w_avg=None, noise=None, progress=None):
    """uint8 images [N, 3, H, W] on the CPU for latents z [N, D]; noise: fixed maps or None (random)."""
    out = []
    for start in tqdm(range(0, len(z), batch), desc=progress, disable=progress is None, leave=False):
        chunk = z[start : start + batch]
        images, _ = g([chunk], truncation=truncation, truncation_latent=w_avg, noise=noise,
                      randomize_noise=noise is None)
        out.append(to_uint8(images).cpu())
    return torch.cat(out)


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
def inception_features(model, images, batch, device, desc=None):
    """Pool3 features [N, 2048] (float64 numpy) of uint8 images, fed as pytorch-fid feeds files (x / 255)."""
    feats = []
    for chunk in tqdm(list(_batches_by_size(images, batch)), desc=desc, disable=desc is None, leave=False):
        pred = model(chunk.to(device).float() / 255)[0]  # [b, dims, 1, 1]
        if pred.shape[2] != 1 or pred.shape[3] != 1:  # an earlier block (--dims < 2048): average over positions
            pred = F.adaptive_avg_pool2d(pred, (1, 1))
        feats.append(pred.squeeze(3).squeeze(2).cpu().double().numpy())
    return np.concatenate(feats)


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
    if os.path.exists(cache):
        data = np.load(cache)
        return data["mu"], data["sigma"], int(data["n"])
    _, images = read_folder(folder)
    feats = inception_features(model, images, batch, device, desc="real images")
    mu, sigma = feature_statistics(feats)
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
    """softmax class probabilities [N, 1000] of uint8 images mapped to [-1, 1] (optionally resized to 299)."""
    if not resize and min(min(image.shape[-2:]) for image in images) < 75:
        raise UserError("the Inception Score at native size needs images of at least 75 px; use --resize (299 px)")
    probs = []
    for chunk in _batches_by_size(images, batch):
        x = chunk.to(device).float() / 127.5 - 1  # [b, 3, H, W] in [-1, 1]
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        probs.append(F.softmax(model(x), dim=1).cpu().double())
    return torch.cat(probs).numpy()


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
    """Index of the training image with the smallest LPIPS to each generated image [N]."""
    center_feats = lpips_features(model, _lpips_input(centers, size).to(device))
    assignment = []
    for start in tqdm(range(0, len(generated), batch), desc="assigning", leave=False):
        feats = lpips_features(model, _lpips_input(generated[start : start + batch], size).to(device))
        b = feats[0].shape[0]
        dist = torch.stack([
            lpips_from_features(model, feats, [c[k : k + 1].expand(b, -1, -1, -1) for c in center_feats])
            for k in range(len(centers))
        ], 1)  # [b, K]
        assignment.append(dist.argmin(1).cpu())
    return torch.cat(assignment)


@torch.no_grad()
def intra_cluster_lpips(model, generated, assignment, n_clusters, device, cluster_size=50, seed=0, batch=32, size=256):
    """Per-cluster mean pairwise LPIPS over at most `cluster_size` members (seeded choice, as the official
    random.shuffle + first 50). Returns (mean, std over clusters with >= 2 members, per-cluster values with
    NaN for clusters with fewer than 2 members, member counts)."""
    rng = random.Random(seed)
    per_cluster = []
    counts = []
    for k in range(n_clusters):
        members = (assignment == k).nonzero().squeeze(1).tolist()
        counts.append(len(members))
        rng.shuffle(members)
        members = members[:cluster_size]
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
    return common.image_grid(images, nrow=len(z))


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


def save_gif(path, frames, duration_ms=100):
    from PIL import Image

    images = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


# ------------------------------------------------------------------------------------------------
# Command line


def latents(n, dim, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator).to(device)  # [N, D], the same on every device


def metrics_for(path, args, device, real_stats=None, fid_model=None, lpips_model=None, centers=None, is_model=None):
    """The metrics asked for in args, for one checkpoint; returns a dict."""
    g = load_generator(path, device)
    z = latents(args.n, g.style_dim, args.seed, device)
    generated = generate(g, z, args.batch, progress=f"generating ({os.path.basename(path)})")
    result = {}
    if fid_model is not None:
        feats = inception_features(fid_model, list(generated), args.batch, device, desc="fid features")
        mu, sigma = feature_statistics(feats)
        result["fid"] = frechet_distance(mu, sigma, real_stats[0], real_stats[1])
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
    model = load_fid_inception(device, args.random_weights, args.dims)
    tag = f"{'random' if args.random_weights else 'pretrained'}-{args.dims}"
    mu_r, sigma_r, n_real = real_statistics(args.real, model, args.batch, device, args.cache_dir, tag)
    if args.fake:
        _, images = read_folder(args.fake)
        source = args.fake
    else:
        g = load_generator(args.ckpt, device)
        images = list(generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating"))
        source = f"{len(images)} samples of {args.ckpt}"
    mu_f, sigma_f = feature_statistics(inception_features(model, images, args.batch, device, desc="fid features"))
    fid = frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
    print(f"FID {fid:.4f}  ({source} vs {n_real} real images in {args.real})")
    if n_real < 1000:
        print(f"note: {n_real} real images; FID is biased upwards for small sets (the papers use 5000 generated images)")
    return fid


def cmd_kid(args, device):
    model = load_fid_inception(device, args.random_weights, args.dims)
    _, real = read_folder(args.real)
    feats_real = inception_features(model, real, args.batch, device, desc="real features")
    g = load_generator(args.ckpt, device)
    fake = list(generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating"))
    feats_fake = inception_features(model, fake, args.batch, device, desc="fake features")
    mean, std = kernel_inception_distance(feats_real, feats_fake, args.subsets, args.subset_size, args.seed)
    print(f"KID {mean:.6f} +- {std:.6f}  ({len(fake)} samples vs {len(real)} real images)")
    return mean, std


def cmd_is(args, device):
    model = load_is_inception(device, args.random_weights)
    g = load_generator(args.ckpt, device)
    images = list(generate(g, latents(args.n, g.style_dim, args.seed, device), args.batch, progress="generating"))
    mean, std = inception_score(inception_probabilities(model, images, args.batch, device, args.resize), args.splits)
    print(f"IS {mean:.4f} +- {std:.4f}  ({len(images)} samples, {args.splits} splits, {'299 px' if args.resize else 'native size'})")
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
    print(f"IC-LPIPS {mean:.4f} +- {std:.4f}  ({len(generated)} samples, {len(centers)} clusters, "
          f"{small} with fewer than 2 members, excluded)")
    print("cluster sizes: " + " ".join(str(c) for c in counts))
    return mean, std, counts


def cmd_compare(args, device):
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.ckpt]
    if len(names) != len(args.ckpt):
        raise UserError(f"--names gives {len(names)} names for {len(args.ckpt)} checkpoints")
    fid_model = real = lpips_model = centers = is_model = None
    if args.real:
        fid_model = load_fid_inception(device, args.random_weights, args.dims)
        tag = f"{'random' if args.random_weights else 'pretrained'}-{args.dims}"
        real = real_statistics(args.real, fid_model, args.batch, device, args.cache_dir, tag)
    if args.train:
        lpips_model = common.load_lpips("vgg", device, random_backbone=args.random_weights)
    if not args.no_is:
        is_model = load_is_inception(device, args.random_weights)
    rows = []
    for name, path in zip(names, args.ckpt):
        if args.train:
            centers = common.ImageFolder(args.train, load_generator(path, "cpu").size).images
        rows.append({"method": name, **metrics_for(path, args, device, real, fid_model, lpips_model, centers, is_model)})
    table = markdown_table(rows)
    print(table)
    with open(args.csv, "w", newline="") as f:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    return rows


def markdown_table(rows):
    """| method | FID | IC-LPIPS | IS | with the columns that were computed."""
    header, cells = ["method"], lambda r: [r["method"]]
    if any("fid" in r for r in rows):
        header.append("FID")
    if any("ic_lpips" in r for r in rows):
        header.append("IC-LPIPS")
    if any("is" in r for r in rows):
        header.append("IS")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = cells(r)
        if "FID" in header:
            values.append(f"{r['fid']:.2f}")
        if "IC-LPIPS" in header:
            values.append(f"{r['ic_lpips']:.4f} ± {r['ic_lpips_std']:.4f}")
        if "IS" in header:
            values.append(f"{r['is']:.3f} ± {r['is_std']:.3f}")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def cmd_grid(args, device):
    source = load_generator(args.source, device)
    models = [source] + [load_generator(p, device) for p in args.ckpt]
    sizes = {m.size for m in models}
    if len(sizes) > 1:
        raise UserError(f"the generators have different resolutions ({sorted(sizes)})")
    z = latents(args.n, source.style_dim, args.seed, device)
    w_avg = source_mean_latent(source, args.truncation, device)
    noise = [getattr(source.noises, f"noise_{k}") for k in range(source.num_layers)]  # one noise for all rows
    grid = correspondence_grid(models, z, args.truncation, w_avg, noise)
    common.save_png(args.out, grid)
    print(f"wrote {args.out} ({len(models)} rows: source, {', '.join(args.ckpt)})")


def cmd_interpolate(args, device):
    source, adapted = load_generator(args.source, device), load_generator(args.ckpt, device)
    z = latents(args.keyframes, source.style_dim, args.seed, device)
    w_avg = source_mean_latent(source, args.truncation, device)
    noise = [getattr(source.noises, f"noise_{k}") for k in range(source.num_layers)]
    frames = interpolation_frames(source, adapted, z, args.steps, args.truncation, w_avg, noise)
    save_gif(args.out, frames, args.duration)
    print(f"wrote {args.out} ({len(frames)} frames)")


def cmd_export(args, device):
    from PIL import Image

    g = load_generator(args.ckpt, device)
    source = load_generator(args.source, device) if args.source else g
    w_avg = source_mean_latent(source, args.truncation, device)
    z = latents(args.n, g.style_dim, args.seed, device)
    os.makedirs(args.out, exist_ok=True)
    for start in tqdm(range(0, args.n, args.batch), desc="exporting"):
        images = generate(g, z[start : start + args.batch], args.batch, args.truncation, w_avg)
        for k, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(args.out, f"{start + k:06d}.png"))
    print(f"wrote {args.n} images to {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Metrics and pictures for adapted generators")
    sub = parser.add_subparsers(dest="command", required=True)

    def common_opts(p, n_default):
        p.add_argument("--n", type=int, default=n_default, help=f"generated images (default {n_default})")
        p.add_argument("--batch", type=int, default=50, help="batch size (default 50: pytorch-fid's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the latents and of every random choice")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--random-weights", action="store_true", help="randomly initialised networks: tests only, numbers meaningless")
        p.add_argument("--cache-dir", default=CACHE_DIR, help="where real-set FID statistics are cached")
        p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                       help="Inception features for FID/KID (default 2048: pool3, the papers'; as pytorch-fid's --dims)")

    p = sub.add_parser("fid", help="FID against a folder of real images (pytorch-fid protocol)")
    common_opts(p, 5000)
    p.add_argument("--real", required=True, help="folder of real target images")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ckpt", help="checkpoint whose g_ema generates --n images")
    group.add_argument("--fake", help="or a folder of generated images")

    p = sub.add_parser("kid", help="Kernel Inception Distance against a folder of real images")
    common_opts(p, 5000)
    p.add_argument("--real", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--subsets", type=int, default=100, help="subsets (default 100: torch-fidelity's)")
    p.add_argument("--subset-size", type=int, default=1000, help="subset size, capped by both set sizes (default 1000)")

    p = sub.add_parser("is", help="Inception Score (10 splits)")
    common_opts(p, 5000)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--splits", type=int, default=10, help="splits (default 10)")
    p.add_argument("--resize", action="store_true", help="resize to 299 px (default: native size, as RSSA's and the progressive paper's scripts)")

    p = sub.add_parser("iclpips", help="intra-cluster LPIPS (CDC)")
    common_opts(p, 1000)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--train", required=True, help="folder of the training (few-shot) images: the cluster centres")
    p.add_argument("--cluster-size", type=int, default=50, help="members per cluster used (default 50: official feat_cluster.py)")

    p = sub.add_parser("compare", help="several checkpoints: Markdown table + CSV")
    common_opts(p, 5000)
    p.add_argument("--ckpt", nargs="+", required=True)
    p.add_argument("--names", nargs="+", help="method names for the table (default: file names)")
    p.add_argument("--real", help="real folder for FID (omit to skip FID)")
    p.add_argument("--train", help="training folder for IC-LPIPS (omit to skip)")
    p.add_argument("--n-lpips", type=int, default=1000, help="generated images used for IC-LPIPS (default 1000: CDC)")
    p.add_argument("--cluster-size", type=int, default=50)
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--resize", action="store_true")
    p.add_argument("--csv", default="results.csv", help="CSV output (default results.csv)")

    p = sub.add_parser("grid", help="correspondence grid: source and adapted generators, same z")
    p.add_argument("--source", required=True)
    p.add_argument("--ckpt", nargs="+", required=True)
    p.add_argument("--n", type=int, default=8, help="columns (default 8)")
    p.add_argument("--truncation", type=float, default=1.0, help="psi, around the source's mean w (default 1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="grid.png")

    p = sub.add_parser("interpolate", help="GIF of straight lines in Z, source | adapted")
    p.add_argument("--source", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--keyframes", type=int, default=5, help="fixed z visited in a loop (default 5)")
    p.add_argument("--steps", type=int, default=40, help="frames between keyframes (default 40: CDC's generate.py)")
    p.add_argument("--duration", type=int, default=100, help="ms per frame (default 100)")
    p.add_argument("--truncation", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="interpolation.gif")

    p = sub.add_parser("export", help="write N generated images as PNGs")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--source", help="source checkpoint for the truncation mean (default: the checkpoint itself)")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--truncation", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output folder")

    args = parser.parse_args(argv)
    for name in ("n", "batch", "steps", "keyframes", "splits", "subsets", "subset_size", "cluster_size", "n_lpips"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "truncation", 1.0) <= 0:
        raise UserError("--truncation must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    torch.manual_seed(getattr(args, "seed", 0))
    handlers = {"fid": cmd_fid, "kid": cmd_kid, "is": cmd_is, "iclpips": cmd_iclpips, "compare": cmd_compare,
                "grid": cmd_grid, "interpolate": cmd_interpolate, "export": cmd_export}
    return handlers[args.command](args, device)


if __name__ == "__main__":
    common.run_main(main)
