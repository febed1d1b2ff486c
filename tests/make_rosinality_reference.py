"""Writes tests/data/rosinality_reference.pt: outputs of rosinality's own model.py on its CPU code path.

Not run by the tests. Usage (with a checkout of rosinality/stylegan2-pytorch whose op/ imports without
compiling, i.e. the two `load(...)` calls replaced by None so the native CPU paths run):

    python tests/make_rosinality_reference.py --rosinality /path/to/stylegan2-pytorch

The weights are not stored: both sides fill every tensor with `deterministic_fill`, so the fixture holds
only inputs' seeds and the outputs (a few hundred KB).
"""

import argparse
import os
import sys

import torch

CASES = [
    # name, generator kwargs, discriminator kwargs
    ("g16_cm2", dict(size=16, style_dim=32, n_mlp=2, channel_multiplier=2), dict(size=16, channel_multiplier=2)),
    ("g64_cm1", dict(size=64, style_dim=32, n_mlp=2, channel_multiplier=1), dict(size=64, channel_multiplier=1)),
]


def deterministic_fill(model, seed=0):
    """Overwrite every parameter and noise buffer with seeded values (FIR kernels are kept)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if name.endswith("kernel"):
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("modulation.bias"):
                values = 1 + 0.3 * values
            elif name.endswith("bias") or name.endswith("noise.weight"):
                values = 0.3 * values
            tensor.copy_(values)


def inputs(style_dim, size):
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, style_dim, generator=generator)
    z2 = torch.randn(2, style_dim, generator=generator)
    x = torch.randn(4, 3, size, size, generator=generator)
    return z, z2, x


def reference_outputs(g, d, style_dim, size):
    z, z2, x = inputs(style_dim, size)
    with torch.no_grad():
        image, _ = g([z], randomize_noise=False)
        mixed, _ = g([z, z2], inject_index=3, randomize_noise=False, truncation=0.7, truncation_latent=torch.zeros(1, style_dim))
        logits = d(x)
    return {"image": image, "mixed": mixed, "logits": logits}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rosinality", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.rosinality))
    import model as rosinality

    results = {}
    for name, gkw, dkw in CASES:
        g = rosinality.Generator(**gkw)
        d = rosinality.Discriminator(**dkw)
        deterministic_fill(g)
        deterministic_fill(d)
        results[name] = reference_outputs(g, d, gkw["style_dim"], gkw["size"])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "rosinality_reference.pt")
    torch.save(results, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
