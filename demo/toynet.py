"""The toy network: a small CNN trained on procedural toy faces, the demo's stand-in for Inception.

    python -m demo.toynet            # trains it and writes demo/toynet.pt (what the repository ships)

It sees 32-px faces of all three styles (source, sketch, sunglasses) and learns, from one 128-d embedding:
the style (3-way softmax), the face's known geometry (demo.toyfaces.GEOMETRY_NAMES), and its appearance
(background, skin, hair and shirt colours where the style shows colour; hair style always). The embedding is
the feature space of the demo's metrics (demo/testbed.py):

    Frechet distance     ||mu_g - mu_t||^2 + Tr(S_g + S_t - 2 (S_g S_t)^(1/2)) of embeddings of generated
                         images and of renders of the full target distribution (FID's formula)
    intra-cluster div.   each generated image joins the nearest of the ten training targets (in the
                         embedding), then the mean pairwise embedding distance inside each cluster, averaged
                         over clusters (the IC-LPIPS protocol, with this network in place of LPIPS)
    geometry error       mean |geometry(G_t(z)) - geometry(G_s(z))| over all geometry entries (positions, size,
                         roll, yaw, gaze, mouth), each in units of its spread over the training faces: how well
                         the adapted image keeps the source image's geometry (0: the same; 2/sqrt(pi) = 1.13
                         for two unrelated faces)
    target share         mean softmax probability of the target style
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo import toyfaces  # noqa: E402

TOYNET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toynet.pt")
EMBED_DIM = 128
APPEARANCE_DIM = 15 + len(toyfaces.HAIR_STYLES)  # bg top/bottom, skin, hair, shirt (RGB / 255), hair style one-hot
TRAIN_SEED_START = 3_000_000


class ToyNet(nn.Module):
    """32-px RGB in [-1, 1] -> 128-d embedding, with style, geometry and appearance heads."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 64, 128]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)  # 32 -> 4 px
        self.embed = nn.Linear(128 * 4 * 4, EMBED_DIM)
        self.style_head = nn.Linear(EMBED_DIM, len(toyfaces.STYLES))
        self.geometry_head = nn.Linear(EMBED_DIM, len(toyfaces.GEOMETRY_NAMES))
        self.appearance_head = nn.Linear(EMBED_DIM, APPEARANCE_DIM)
        # the geometry head predicts standardised geometry (z-scores over the training faces)
        self.register_buffer("geometry_mean", torch.zeros(len(toyfaces.GEOMETRY_NAMES)))
        self.register_buffer("geometry_std", torch.ones(len(toyfaces.GEOMETRY_NAMES)))

    def standardise(self, geometry):
        return (geometry - self.geometry_mean) / self.geometry_std

    def embedding(self, images):
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="area")
        return F.leaky_relu(self.embed(self.trunk(images).flatten(1)), 0.2)  # [B, 128]

    def forward(self, images):
        e = self.embedding(images)  # [B, 128]
        return e, self.style_head(e), self.geometry_head(e), self.appearance_head(e)


def load_toynet(path=TOYNET_PATH, device="cpu"):
    from common import UserError

    if not os.path.exists(path):
        raise UserError(f"toy network weights {path} are missing; rebuild them with: python -m demo.toynet")
    net = ToyNet()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(device).eval().requires_grad_(False)


class ToyPerceptual(nn.Module):
    """The demo's stand-in for LPIPS-VGG (RSSA's inversion and BSA's perceptual term in demo mode, where no VGG
    weights are at hand): LPIPS's distance without its learned per-channel weights (the lpips package's lin=False),
    on the toy network's three trunk stages (16, 8 and 4 px at 32-px input) in place of VGG's:
        d(x, y) = sum_l mean_{h,w} sum_c (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2, |.| the norm over channels.
    Called as an lpips.LPIPS model: images in [-1, 1], returns [B, 1, 1, 1]. The testbed scores with the same
    network's embedding: a method that optimises this distance is checked by a relative of its own guide."""

    STAGE_ENDS = (3, 7, 11)  # indices in ToyNet.trunk after each stage's second LeakyReLU

    def __init__(self, net):
        super().__init__()
        self.net = net

    def stages(self, images):
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="area")
        features, h = [], images
        for index, layer in enumerate(self.net.trunk):
            h = layer(h)
            if index in self.STAGE_ENDS:
                features.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
        return features

    def forward(self, x, y):
        # sum_l mean_{h,w} sum_c (f_l(x) - f_l(y))^2 of the unit-normalised features
        return sum((a - b).pow(2).sum(1, keepdim=True).mean((2, 3), keepdim=True)
                   for a, b in zip(self.stages(x), self.stages(y)))  # [B, 1, 1, 1]


def load_toy_perceptual(device="cpu"):
    """ToyPerceptual on the shipped toy network (demo/toynet.pt), frozen, in eval mode."""
    return ToyPerceptual(load_toynet(device=device)).eval()


@torch.no_grad()
def toy_outputs(net, images, batch=256):
    """(embeddings [N, 128], style probabilities [N, 3], standardised geometry [N, G]) of images [N, 3, H, W] in [-1, 1]."""
    device = next(net.parameters()).device
    embeds, probs, geoms = [], [], []
    for start in range(0, len(images), batch):
        e, style, geometry, _ = net(images[start:start + batch].to(device).float())
        embeds.append(e.cpu())
        probs.append(style.softmax(1).cpu())
        geoms.append(geometry.cpu())
    return torch.cat(embeds), torch.cat(probs), torch.cat(geoms)


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two sets of embeddings [N, D] (FID's formula)."""
    from evaluate import feature_statistics, frechet_distance as fd

    return fd(*feature_statistics(feats_a.double().numpy()), *feature_statistics(feats_b.double().numpy()))


def intra_cluster_diversity(feats_generated, feats_targets, cluster_size=50):
    """Mean pairwise embedding distance inside the clusters of generated images around each target."""
    assignment = torch.cdist(feats_generated, feats_targets).argmin(1)  # [N]
    means = []
    for k in range(len(feats_targets)):
        members = feats_generated[assignment == k][:cluster_size]  # [n_k, D]
        if len(members) >= 2:
            d = torch.cdist(members, members)  # [n_k, n_k]
            means.append(d.sum() / (len(members) * (len(members) - 1)))
    return float(torch.stack(means).mean()) if means else 0.0


def geometry_error(geometry_source, geometry_adapted):
    """Mean absolute difference of standardised geometry [N, G]: 0 for the same faces, ~1.13 for unrelated ones."""
    return float((geometry_source - geometry_adapted).abs().mean())


def appearance_vector(params):
    style = np.zeros(len(toyfaces.HAIR_STYLES), np.float32)
    style[toyfaces.HAIR_STYLES.index(params["hair_style"])] = 1
    colours = np.concatenate([params["bg_top"], params["bg_bottom"], params["skin"], params["hair"], params["shirt"]]) / 255
    return np.concatenate([np.clip(colours, 0, 1).astype(np.float32), style])


def make_training_set(n_faces, size=32):
    """Renders of n_faces faces in every style: images uint8 [3n, 3, H, W], style labels, geometry, appearance."""
    images, styles, geometry, appearance = [], [], [], []
    for seed in range(TRAIN_SEED_START, TRAIN_SEED_START + n_faces):
        params = toyfaces.sample_params(seed)
        for k, style in enumerate(toyfaces.STYLES):
            images.append(toyfaces.render(params, style, size))
            styles.append(k)
            geometry.append(toyfaces.geometry(params))
            appearance.append(appearance_vector(params))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(styles),
            torch.from_numpy(np.stack(geometry)), torch.from_numpy(np.stack(appearance)))


def train(n_faces=8000, epochs=12, batch=128, lr=2e-3, seed=0, log=print):
    torch.manual_seed(seed)
    images, styles, geometry, appearance = make_training_set(n_faces)
    colour_shown = torch.tensor([s != "sketch" for s in toyfaces.STYLES])[styles].float()  # [N]
    hair_style = slice(15, None)
    net = ToyNet()
    net.geometry_mean.copy_(geometry.mean(0))
    net.geometry_std.copy_(geometry.std(0))
    geometry = net.standardise(geometry)
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(images) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images) - batch + 1, batch):
            idx = order[start:start + batch]
            x = images[idx].float() / 127.5 - 1  # [B, 3, 32, 32]
            x = x + 0.03 * torch.randn_like(x)  # a little pixel noise: generated images are not clean renders
            _, style_logits, geometry_pred, appearance_pred = net(x)
            appearance_err = (appearance_pred - appearance[idx]).square()  # [B, A]
            # style CE + geometry MSE + appearance MSE (colours only where the style shows them)
            loss = (F.cross_entropy(style_logits, styles[idx]) + (geometry_pred - geometry[idx]).square().mean()
                    + (appearance_err[:, :15].mean(1) * colour_shown[idx]).mean() + appearance_err[:, hair_style].mean())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def held_out_report(net, n_faces=500):
    """Style accuracy and standardised geometry error on faces the network never saw."""
    seeds = range(toyfaces.EVAL_SEED_START + 500_000, toyfaces.EVAL_SEED_START + 500_000 + n_faces)
    truth = net.standardise(torch.from_numpy(np.stack([toyfaces.geometry(toyfaces.sample_params(s)) for s in seeds])))
    report = {}
    for k, style in enumerate(toyfaces.STYLES):
        _, probs, geometry = toy_outputs(net, toyfaces.render_batch(seeds, style, 32))
        report[style] = (float((probs.argmax(1) == k).float().mean()), geometry_error(truth, geometry))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description="train the demo's toy feature network")
    p.add_argument("--out", default=TOYNET_PATH)
    p.add_argument("--faces", type=int, default=8000, help="faces rendered in each of the three styles (our choice)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (our choice: about 10 min on one CPU core)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.time()
    net = train(args.faces, args.epochs)
    torch.save(net.state_dict(), args.out)
    for style, (accuracy, error) in held_out_report(net).items():
        print(f"held-out {style}: style accuracy {accuracy:.3f}, geometry error {error:.3f} (standardised)")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
