"""The torchrun side of tests/test_ddp.py: one launch of N processes runs every job in turn, so the interpreters,
imports and process group start once (a torchrun launch per job would cost seconds each on two cores).

    python -m torch.distributed.run --nproc_per_node 2 -- tests/ddp_runs.py ROOT SOURCE TARGET

Jobs, in this order (results under ROOT, written by rank 0):
  - evaluate.py fid and iclpips of ROOT/eval/model.pt (float32, as a user runs them; LPIPS on SqueezeNet): their
    return values;
  - CDC's distance-consistency loss of 4 rows gathered from 2 per process, and the gradient each process's rows get;
  - cdc.py and c3.py, 4 iterations from SOURCE to TARGET, in float64 (see test_ddp.py);
  - cdc.py stopped by a Ctrl-C that reaches rank 1 only, during iteration 0, then resumed to 4 iterations;
and every file a process writes through save_atomically or write_atomically (ROOT/writes_<rank>.txt).
"""

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import runtime  # noqa: E402

# the batch and the run lengths test_ddp.py compares with (the batch splits 2 / 2; the path-length batch of 2 too;
# CDC's 3 latents are computed whole in each process, C3's 4 split)
TRAIN = ["--batch", "4", "--n-sample", "4", "--device", "cpu", "--iter", "4", "--sample-every", "2", "--save-every", "100"]
CDC = ["--feat-const-batch", "3"]
C3 = ["--con-batch", "4"]
FID = ["fid", "--n", "5", "--batch", "2", "--device", "cpu", "--random-weights", "--dims", "64"]  # 3 chunks: 2 and 1 per process
ICLPIPS = ["iclpips", "--n", "4", "--batch", "2", "--device", "cpu", "--random-weights"]


def as_float64():
    """Every float tensor in float64: the default dtype, and the explicit .float() of images and projectors."""
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = torch.Tensor.double


def dc_loss_features(seed, n=4):
    """Seeded per-layer features [n, C, H, W] (the same in every process)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, s, s, generator=generator) for c, s in ((4, 4), (3, 8), (2, 8))]


DC_LAYERS = [0, 2, 1, 2]  # each row's layer (every layer used: each gets a gradient)


def squeezenet_lpips(load_lpips):
    """load_lpips with LPIPS's SqueezeNet backbone whatever the net asked for: IC-LPIPS's sharding does not depend on
    the backbone, and a VGG16 forward at LPIPS's 256 px costs 0.7 s per image on the 2-core CPU (SqueezeNet 0.05 s)."""
    return lambda net="vgg", device="cpu", random_backbone=False: load_lpips("squeeze", device, random_backbone)


def record_writes(path):
    """Append every checkpoint and PNG this process writes to `path` (runtime writes both through these two)."""
    save_atomically, write_atomically = runtime.save_atomically, runtime.write_atomically

    def log(target):
        with open(path, "a") as f:
            f.write(f"{target}\n")

    def recorded_save_atomically(state, target):
        log(target)
        return save_atomically(state, target)

    def recorded_write_atomically(target, write):
        log(target)
        return write_atomically(target, write)

    runtime.save_atomically = recorded_save_atomically
    runtime.write_atomically = recorded_write_atomically


def main(root, source, target):
    import c3
    import cdc
    import evaluate

    record_writes(os.path.join(root, f"writes_{runtime.rank()}.txt"))
    common.load_lpips = squeezenet_lpips(common.load_lpips)
    results = {}
    eval_dir = os.path.join(root, "eval")
    results["fid"] = evaluate.main([*FID, "--ckpt", os.path.join(eval_dir, "model.pt"), "--real", os.path.join(eval_dir, "real"),
                                    "--cache-dir", os.path.join(root, "fid-cache")])
    results["iclpips"] = list(evaluate.main([*ICLPIPS, "--ckpt", os.path.join(eval_dir, "model.pt"), "--train", os.path.join(eval_dir, "train")]))

    as_float64()
    from cdc import distance_consistency_loss

    share = [f[runtime.rows(4)].clone().requires_grad_(True) for f in dc_loss_features(4)]  # this process's 2 rows
    loss = distance_consistency_loss(dc_loss_features(3), runtime.gather(share, 4), torch.tensor(DC_LAYERS))
    loss.backward()
    results["dc_loss"] = loss.item()
    torch.save([runtime.gather_rows(s.grad) for s in share], os.path.join(root, "dc_grads.pt"))

    base = ["--source", source, "--target", target, *TRAIN]
    cdc.main([*base, *CDC, "--out", os.path.join(root, "cdc")])
    c3.main([*base, *C3, "--out", os.path.join(root, "c3")])

    # Ctrl-C in rank 1 only, during iteration 0 (its flag is read at the end of iteration 1): every process stops
    # after iteration 1, rank 0 writes checkpoints/000002.pt, and the run resumes from it to iteration 4
    any_process, calls = runtime.any_process, []

    def interrupted_in_rank_1(flag):
        calls.append(flag)
        if len(calls) == 1 and runtime.rank() == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return any_process(flag)

    runtime.any_process = interrupted_in_rank_1
    try:
        cdc.main([*base, *CDC, "--out", os.path.join(root, "interrupted")])
    except SystemExit as stop:
        results["interrupted_exit"] = stop.code
    runtime.any_process = any_process
    torch.distributed.barrier()
    cdc.main(["--resume", os.path.join(root, "interrupted", "checkpoints", "000002.pt"), "--iter", "4"])

    if runtime.is_main():
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)
    runtime.end_processes()


if __name__ == "__main__":
    main(*sys.argv[1:])
