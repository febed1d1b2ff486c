"""Our G and D against outputs that rosinality's own model.py computed on its CPU path (float32).

tests/data/rosinality_reference.pt was written by tests/make_rosinality_reference.py from
rosinality/stylegan2-pytorch (model.py at 7e46e475, op/ native CPU paths) with the same deterministic
weights; the issue's bar is 1e-4 max abs.
"""

import os

import pytest
import torch

from make_rosinality_reference import CASES, deterministic_fill, reference_outputs
from stylegan2 import Discriminator, Generator

REFERENCE = torch.load(os.path.join(os.path.dirname(__file__), "data", "rosinality_reference.pt"), weights_only=True)


@pytest.mark.parametrize("name,gkw,dkw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["grouped", "shared"])
def test_matches_rosinality_outputs(name, gkw, dkw, form):
    g = Generator(**gkw)
    d = Discriminator(**dkw)
    deterministic_fill(g)
    deterministic_fill(d)
    g.set_modconv_form(form)
    ours = reference_outputs(g, d, gkw["style_dim"], gkw["size"])
    for key, expected in REFERENCE[name].items():
        assert ours[key].shape == expected.shape
        assert (ours[key] - expected).abs().max().item() < 1e-4, key
