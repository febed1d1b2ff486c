"""The generator step's per-term backward (common.BackwardEachTerm, less memory) against the single backward over the
summed loss it replaced: the gradients of every optimiser step of a few tiny iterations agree to 1e-6 relative."""

import pytest
import torch

import baselines
import c3
import cdc
import common
import progressive_asc
import rssa

pytestmark = pytest.mark.usefixtures("one_thread")

# method, its extra arguments: 2 iterations, so that G differs from G_s in the second (the consistency terms have
# gradients), with every term on
RUNS = {
    "cdc": (cdc, ["--feat-const-batch", "3"]),
    "c3": (c3, ["--con-batch", "3"]),
    "rssa": (rssa, ["--invert-steps", "2", "--lpips-random-backbone", "--dcc-every", "1"]),
    "progressive_asc": (progressive_asc, ["--feat-const-batch", "3"]),
    "ewc": (baselines, ["--baseline", "ewc", "--ewc-fisher-batches", "2"]),
}


def gradients_of_every_step(monkeypatch, module, argv, summed):
    """The .grad of every parameter at each optimiser step of a run, in step order, and how many loss terms
    with a gradient went through common.BackwardEachTerm."""
    steps, terms = [], []
    adam_step = torch.optim.Adam.step
    add_term = common.BackwardEachTerm.backward

    def counting_add(self, loss):
        terms.append(loss.requires_grad)
        return add_term(self, loss)

    def recording_step(optimizer, *args, **kwargs):
        steps.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"] if p.grad is not None])
        return adam_step(optimizer, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", recording_step)
        patch.setattr(common.BackwardEachTerm, "summed", summed)
        patch.setattr(common.BackwardEachTerm, "backward", counting_add)
        torch.manual_seed(0)
        module.main(argv)
    return steps, sum(terms)


@pytest.mark.parametrize("name", list(RUNS))
def test_per_term_backward_gives_the_summed_gradients(name, setup, monkeypatch):
    root, source, target = setup
    module, extra = RUNS[name]
    # RSSA's target inversion only needs some image distance here (the G step is under test): no VGG to build
    monkeypatch.setattr(common, "load_lpips", lambda *args, **kwargs: lambda a, b: (a - b).abs().mean((1, 2, 3), keepdim=True))
    (per_term, n_terms), (summed, _) = (
        gradients_of_every_step(monkeypatch, module, [
            "--source", source, "--target", target, "--out", str(root / f"{name}-{form}"), "--batch", "2", "--iter", "2",
            "--n-sample", "2", "--sample-every", "100", "--save-every", "100", "--device", "cpu", *extra], form == "summed")
        for form in ("per_term", "summed"))
    assert n_terms >= 4  # L_G and at least one more term in each of the two G steps: the two forms really differ
    assert len(per_term) == len(summed) >= 6  # D (and its patch head), R1, G, path length; D, G
    for a_step, b_step in zip(per_term, summed):
        assert len(a_step) == len(b_step)
        for a, b in zip(a_step, b_step):
            assert (a - b).norm() <= 1e-6 * b.norm() + 1e-12, (name, (a - b).norm() / b.norm())


def test_rssa_inversion_in_chunks_gives_the_same_codes(setup, monkeypatch):
    """--invert-batch: the targets' independent inversions in chunks (less memory) give the all-at-once codes."""
    root, source, target = setup
    monkeypatch.setattr(common, "load_lpips", lambda *args, **kwargs: lambda a, b: (a - b).abs().mean((1, 2, 3), keepdim=True))
    calls = []
    invert_wplus = common.invert_wplus
    monkeypatch.setattr(common, "invert_wplus", lambda g, images, *args: calls.append(len(images)) or invert_wplus(g, images, *args))
    codes = []
    for batch in ("0", "2"):
        out = root / f"invert-batch-{batch}"
        rssa.main(["--source", source, "--target", target, "--out", str(out), "--batch", "2", "--iter", "1", "--invert-steps", "3",
                   "--invert-batch", batch, "--n-sample", "2", "--sample-every", "100", "--save-every", "100", "--device", "cpu"])
        codes.append(torch.load(out / "target_codes.pt", weights_only=True)["codes"])
    assert calls == [5, 2, 2, 1]  # all five targets at once, then chunks of 2, 2, 1
    assert codes[0].shape == codes[1].shape and len(codes[0]) == 5
    assert torch.allclose(codes[0], codes[1], rtol=1e-4, atol=1e-6)
