"""Run folders and resume, as a user meets them: Ctrl-C then the printed command from another folder, a
continued copy that leaves the original untouched, runs that never write over another run, options a resumed
run keeps, and failed starts that leave nothing behind."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cdc
from common import UserError
from conftest import ROOT, assert_cli_errors

FAST = ["--batch", "2", "--feat-const-batch", "3", "--n-sample", "4", "--device", "cpu"]


def tree_digest(folder):
    """{relative path: sha256} of every file under folder."""
    digest = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def assert_same_run(a, b, final):
    """Two run folders with equal logs, sample grids (bytes) and final weights."""
    assert open(os.path.join(a, "log.csv")).read() == open(os.path.join(b, "log.csv")).read()
    samples_a, samples_b = tree_digest(os.path.join(a, "samples")), tree_digest(os.path.join(b, "samples"))
    assert samples_a == samples_b and samples_a
    state_a = torch.load(os.path.join(a, "checkpoints", final), weights_only=True)
    state_b = torch.load(os.path.join(b, "checkpoints", final), weights_only=True)
    for key in ("g", "g_ema", "d", "patch_head"):
        for name, tensor in state_a[key].items():
            assert torch.equal(tensor, state_b[key][name]), (key, name)


def fake_earlier_run(folder):
    """A run folder as an earlier demo run leaves it: a long log, a checkpoint, a sample grid."""
    os.makedirs(os.path.join(folder, "checkpoints"))
    os.makedirs(os.path.join(folder, "samples"))
    with open(os.path.join(folder, "log.csv"), "w") as f:
        f.write("iter,d,g\n" + "".join(f"{i},1,2\n" for i in range(1501)))
    with open(os.path.join(folder, "checkpoints", "001500.pt"), "wb") as f:
        f.write(os.urandom(256))
    with open(os.path.join(folder, "samples", "001500.png"), "wb") as f:
        f.write(os.urandom(64))


@pytest.mark.several_processes
def test_ctrl_c_then_the_printed_command_from_another_folder_continues_the_same_run(setup, tmp_path):
    _, source, target = setup
    iters = ["--iter", "16", "--sample-every", "4", "--save-every", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start_dir, other_dir = tmp_path / "start", tmp_path / "elsewhere"
    start_dir.mkdir()
    other_dir.mkdir()
    # the folder the old code resumed into: the demo's default run folder, seen from the new working folder
    fake_earlier_run(str(other_dir / "runs" / "cdc-demo"))
    fake_earlier_run(str(other_dir / "runs" / "cdc-target"))
    before = tree_digest(str(other_dir / "runs"))

    command = [sys.executable, os.path.join(ROOT, "cdc.py"), "--source", source, "--target", target, *FAST, *iters]
    straight = subprocess.Popen([*command, "--out", "straight"], cwd=start_dir, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen([*command, "--out", "interrupted"], cwd=start_dir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = start_dir / "interrupted" / "log.csv"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().split()) >= 3) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert straight.wait(timeout=120) == 0, straight.stderr.read()
    hint = stdout.strip().splitlines()[-1]
    assert hint.startswith("stopped by Ctrl-C, ") and " iterations done of " in hint and "resume with: " in hint
    done = int(hint.split("stopped by Ctrl-C, ")[1].split()[0])  # the checkpoint holds that many iterations
    assert f"(saved in {done:06d}.pt)" in hint
    printed = hint.split("resume with: ", 1)[1]
    assert printed.startswith("python ") and os.path.isabs(printed.split()[1])

    # exactly the printed command, from another working folder (python -> this interpreter)
    resumed = subprocess.run([sys.executable, *printed.split()[1:]], cwd=other_dir, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(str(start_dir / "straight"), str(start_dir / "interrupted"), "000016.pt")
    assert tree_digest(str(other_dir / "runs")) == before  # unrelated runs byte for byte unchanged
    assert not (other_dir / "runs" / "cdc-demo-2").exists()


def test_resume_into_another_folder_is_a_copy_that_leaves_the_original_untouched(setup, tmp_path):
    _, source, target = setup
    common_args = ["--source", source, "--target", target, *FAST, "--sample-every", "2", "--save-every", "3"]
    cdc.main([*common_args, "--iter", "6", "--out", str(tmp_path / "straight")])
    cdc.main([*common_args, "--iter", "3", "--out", str(tmp_path / "original")])
    before = tree_digest(str(tmp_path / "original"))
    checkpoint = str(tmp_path / "original" / "checkpoints" / "000003.pt")
    cdc.main(["--resume", checkpoint, "--out", str(tmp_path / "copy"), "--iter", "6"])
    assert tree_digest(str(tmp_path / "original")) == before
    assert open(tmp_path / "straight" / "log.csv").read() == open(tmp_path / "copy" / "log.csv").read()
    a = torch.load(tmp_path / "straight" / "checkpoints" / "000006.pt", weights_only=True)
    b = torch.load(tmp_path / "copy" / "checkpoints" / "000006.pt", weights_only=True)
    assert all(torch.equal(t, b["g"][k]) for k, t in a["g"].items())
    # the copy continues with the original's settings and records them for its own resume
    assert b["run_args"]["batch"] == 2 and b["run_args"]["source"] == os.path.abspath(source)
    # --resume with no value continues the latest checkpoint of --out, with a longer schedule
    cdc.main(["--resume", "--out", str(tmp_path / "copy"), "--iter", "7"])
    rows = open(tmp_path / "copy" / "log.csv").read().split()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(7)]


def test_a_new_run_never_writes_over_another(setup, tmp_path, monkeypatch, capsys):
    _, source, target = setup
    monkeypatch.chdir(tmp_path)
    args = ["--source", source, "--target", target, *FAST, "--iter", "1"]
    cdc.main(args)
    cdc.main(args)  # the default folder holds a run: the next free name
    assert (tmp_path / "runs" / "cdc-target" / "log.csv").exists() and (tmp_path / "runs" / "cdc-target-2" / "log.csv").exists()
    before = tree_digest(str(tmp_path / "runs" / "cdc-target"))
    with pytest.raises(UserError, match="already holds a run"):
        cdc.parse_args([*args, "--out", os.path.join("runs", "cdc-target")])
    assert tree_digest(str(tmp_path / "runs" / "cdc-target")) == before
    (tmp_path / "runs" / "cdc-target" / "cache.pt").write_bytes(b"kept")
    cdc.main([*args, "--out", os.path.join("runs", "cdc-target"), "--overwrite", "--iter", "2"])
    assert len(open(tmp_path / "runs" / "cdc-target" / "log.csv").read().split()) == 3
    assert os.listdir(tmp_path / "runs" / "cdc-target" / "checkpoints") == ["000002.pt"]
    assert (tmp_path / "runs" / "cdc-target" / "cache.pt").read_bytes() == b"kept"
    # a demo run in a folder with an earlier demo run goes next to it
    fake_earlier_run(str(tmp_path / "runs" / "cdc-demo"))
    assert cdc.parse_args(["--iter", "2"]).out == os.path.join("runs", "cdc-demo-2")
    assert "into runs/cdc-demo-2" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_settings(setup, tmp_path):
    import c3

    _, source, target = setup
    out = tmp_path / "run"
    cdc.main(["--source", source, "--target", target, *FAST, "--iter", "2", "--out", str(out), "--kl-wt", "10"])
    checkpoint = str(out / "checkpoints" / "000002.pt")
    args = cdc.parse_args(["--resume", checkpoint, "--iter", "5", "--device", "cpu"])
    assert (args.kl_wt, args.batch, args.iter, args.out, args.resume) == (10, 2, 5, str(out), checkpoint)
    # the same options given again are fine; a different value is refused
    assert cdc.parse_args(["--resume", checkpoint, "--source", source, "--kl-wt", "10"]).kl_wt == 10
    with pytest.raises(UserError, match="--batch 4 differs from the resumed run's 2"):
        cdc.parse_args(["--resume", checkpoint, "--batch", "4"])
    with pytest.raises(UserError, match="cdc.py checkpoint; resume it with cdc.py"):
        c3.parse_args(["--resume", checkpoint])
    loose = tmp_path / "loose.pt"
    loose.write_bytes(open(checkpoint, "rb").read())
    with pytest.raises(UserError, match="not inside a run folder"):
        cdc.parse_args(["--resume", str(loose)])
    other = tmp_path / "other"
    fake_earlier_run(str(other))
    with pytest.raises(UserError, match="already holds another run"):
        cdc.parse_args(["--resume", checkpoint, "--out", str(other)])


def test_failed_starts_leave_no_run_folder_and_say_one_line(setup, tmp_path):
    _, source, target = setup
    out = tmp_path / "never"
    base = ["--device", "cpu", "--out", str(out)]
    cases = [
        (["--iter", "-5"], "--iter must be at least 1, got -5"),  # demo mode: no banner before the error
        (["--iter", "0"], "--iter must be at least 1, got 0"),
        (["--source", source, "--target", target, "--resume", str(tmp_path / "nope.pt")], "checkpoint not found"),
        (["--source", source, "--target", str(tmp_path / "missing")], "target not found"),
        (["--source", source, "--target", target, "--batch", "6"], "multiple of 4"),
    ]
    assert_cli_errors("cdc.py", cases, base)
    assert not out.exists()
    # a start that fails after the networks are built (a resume checkpoint of other networks)
    cdc.main(["--source", source, "--target", target, *FAST, "--iter", "1", "--out", str(tmp_path / "ok")])
    state = torch.load(tmp_path / "ok" / "checkpoints" / "000001.pt", weights_only=True)
    state["g"] = {k: v[..., :1] if v.ndim > 1 else v for k, v in state["g"].items()}
    os.makedirs(tmp_path / "bad" / "checkpoints")
    torch.save(state, tmp_path / "bad" / "checkpoints" / "000001.pt")
    with pytest.raises(UserError, match="does not match"):
        cdc.main(["--resume", str(tmp_path / "bad" / "checkpoints" / "000001.pt"), "--out", str(out), "--iter", "2"])
    assert not out.exists()


def test_a_torchvision_that_does_not_match_torch_ends_in_one_line(capsys, monkeypatch):
    import runtime

    def main(argv):  # what importing a mismatched torchvision build raises
        raise RuntimeError("operator torchvision::nms does not exist")

    with pytest.raises(SystemExit) as stop:
        runtime.run_main(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not work with torch" in err and "torchvision::nms" in err
    assert "pip install --force-reinstall torch==" in err and "torchvision" in err

    def importing(argv):  # a torchvision that cannot be imported at all
        import torchvision.ops  # noqa: F401

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.ops", raising=False)
    with pytest.raises(SystemExit) as stop:
        runtime.run_main(importing)
    assert stop.value.code == 2 and "torchvision" in capsys.readouterr().err

    def other(argv):  # any other error keeps its traceback
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        runtime.run_main(other)


def test_threads_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        assert cdc.parse_args(["--threads", "1"]).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cdc.parse_args([]).threads == 0
    with pytest.raises(UserError, match="--threads must be 0"):
        cdc.parse_args(["--threads", "-1"])
