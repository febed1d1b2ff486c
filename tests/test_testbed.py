"""The testbed's grid, schedules, round-trip score, score files, verdict rule and claims table (demo/testbed.py), and `--demo`."""

import argparse
import importlib
import json
import os

import cv2
import numpy as np
import pytest
import torch

import common
import runtime
from demo import testbed, toyfaces


def grid_args(**overrides):
    values = dict(schedule="demo", iter=None, work_dir="w", scores="s", styles=["sketch"], seeds=[1], n_eval=10)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_run_folders_keep_the_plain_names_of_the_default_grid_and_name_every_other_axis():
    args = grid_args()
    assert testbed.Run("cdc", "sketch", 10, 1).folder(args) == os.path.join("w", "cdc-sketch")
    assert testbed.Run("cdc", "sketch", 5, 2).folder(args) == os.path.join("w", "cdc-sketch-5shot-seed2")
    # DiFa and NADA train on one image whatever --shots says; their text rows on none
    assert testbed.Run("difa", "sketch", 5, 1).folder(args) == os.path.join("w", "difa-sketch")
    assert testbed.Run("nada_text", "sunglasses", 1, 1).shots == 0
    paper = grid_args(schedule="paper")
    assert testbed.Run("rssa", "sketch", 5, 1, back=True).folder(paper) == os.path.join("w", "rssa-sketch-5shot-paper-back")
    assert testbed.Run("rssa", "sketch", 10, 1).iters(paper) == 2001
    assert testbed.Run("rssa", "sketch", 10, 1).iters(grid_args()) is None  # the demo schedule: the script's own
    assert testbed.Run("cdc", "sketch", 10, 1).folder(grid_args(iter=7)) == os.path.join("w", "cdc-sketch-7it")


def test_training_images_are_all_ten_at_ten_shots_and_a_fixed_draw_per_seed_otherwise():
    ten = testbed.training_images("sketch", 10, 1)
    assert len(ten) == 10 and ten == sorted(ten)
    five = testbed.training_images("sketch", 5, 1)
    assert len(set(five)) == 5 and set(five) <= set(ten)
    assert testbed.training_images("sketch", 5, 1) == five  # fixed per seed: every method trains on the same five
    assert testbed.training_images("sketch", 5, 2) != five
    # the same draw for every style: an attribute change and a style change of the same faces
    assert [os.path.basename(p) for p in testbed.training_images("sunglasses", 5, 1)] == [os.path.basename(p) for p in five]


@pytest.mark.parametrize("script, extra", [("cdc", []), ("c3", []), ("progressive_asc", []), ("rssa", []),
                                           ("baselines", ["--baseline", "tgan"]), ("baselines", ["--baseline", "bsa"])])
def test_paper_schedule_is_each_script_s_own_default(script, extra, tmp_path):
    """PAPER_ITERS restates the scripts' defaults (a run with --source and --target, outside the demo)."""
    module = importlib.import_module(script)
    args = module.parse_args(["--source", str(tmp_path / "s.pt"), "--target", str(tmp_path), *extra])
    name = extra[1] if extra else script
    assert args.iter == testbed.PAPER_ITERS[name]
    assert not args.demo


@pytest.mark.parametrize("name, base", [("cdc_scaled", "cdc"), ("c3_scaled", "c3"), ("rssa_scaled", "rssa"),
                                        ("progressive_asc_scaled", "progressive_asc")])
def test_scaled_rows_parse_stay_out_of_the_default_grid_and_keep_their_method_s_schedule(name, base, tmp_path):
    """The rows of docs/demo-and-testbed.md, "The testbed's scale": their method's script with flags it accepts."""
    script, extra = testbed.METHODS[name]
    assert script == testbed.METHODS[base][0] and name not in testbed.DEFAULT_METHODS
    assert testbed.PAPER_ITERS[name] == testbed.PAPER_ITERS[base]
    args = importlib.import_module(script[:-3]).parse_args([*extra, "--demo", "--iter", "1", "--out", str(tmp_path / name)])
    assert args.highp == 2  # the demo D's patch maps 1 (32x32) and 2 (16x16)
    if base == "progressive_asc":
        assert (args.asc_layers, args.winsize, args.blur) == ("to-half", 2, 1)
    from checkpoints import load_checkpoint

    d = load_checkpoint(runtime.DEMO_SOURCE, require=("d",), device="cpu")[0]["d"]
    maps = common.patch_map_indices(d)
    assert args.highp <= len(maps) == 3 and [d.feature_map_shapes()[k][1] for k in maps[:args.highp]] == [32, 16]


def test_demo_flag_keeps_the_demo_settings_with_another_target(tmp_path):
    import cdc

    args = cdc.parse_args(["--demo", "--target", str(tmp_path)])
    assert args.demo and args.source == runtime.DEMO_SOURCE and args.target == str(tmp_path)
    assert args.iter == runtime.DEMO_SCHEDULE["iter"] and args.n_sample == runtime.DEMO_SCHEDULE["n_sample"]
    assert cdc.parse_args(["--demo", "--target", str(tmp_path), "--iter", "9"]).iter == 9  # given options still win
    plain = cdc.parse_args(["--source", runtime.DEMO_SOURCE, "--target", str(tmp_path)])
    assert not plain.demo and plain.iter == 5002


def test_round_trip_score_of_a_perfect_reconstruction_and_of_another_generator():
    net = testbed.load_toynet()
    images = torch.from_numpy(np.stack([toyfaces.render_seed(s, "source", 32) for s in range(8)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    same = testbed.round_trip_score(net, images, images.clone())
    assert same["RT MSE"] == 0 and same["RT cos"] == pytest.approx(1, abs=1e-5) and same["RT geom"] == 0
    other = testbed.round_trip_score(net, images, images.flip(0))
    assert other["RT MSE"] > 0.01 and other["RT cos"] < same["RT cos"] and other["RT geom"] > 0.3


def test_ic_div10_clusters_around_the_ten_targets_whatever_the_run_trained_on():
    net = testbed.load_toynet()
    images = toyfaces.render_batch(range(40), "sketch", 32)  # [40, 3, 32, 32]
    ten = testbed.toy_outputs(net, toyfaces.render_batch(toyfaces.TARGET_SEEDS, "sketch", 32))[0]  # [10, D]
    feats = testbed.toy_outputs(net, images)[0]
    one_shot = testbed.score(net, images, None, feats, ten[:1], 1, ten_feats=ten)
    ten_shot = testbed.score(net, images, None, feats, ten, 1, ten_feats=ten)
    assert one_shot["IC-div10"] == ten_shot["IC-div10"] == ten_shot["IC-div"]  # the same images, the same column
    assert one_shot["IC-div"] > one_shot["IC-div10"]  # one large cluster spans the whole sample
    assert "IC-div10" not in testbed.score(net, images, None, feats, ten, 1)


def test_claims_table_gives_verdicts_from_the_numbers_and_names_missing_runs():
    def runs(**columns):
        return [{k: v for k, v in columns.items()}]

    results = {("sketch", 10, "cdc"): runs(FD=30.0, **{"IC-div": 6.0, "IC-div10": 6.0, "geom err": 0.4}),
               ("sketch", 5, "cdc"): runs(**{"IC-div": 7.5, "IC-div10": 6.5}),
               ("sketch", 1, "cdc"): runs(**{"IC-div": 9.0, "IC-div10": 5.0}),
               ("sketch", 10, "tgan"): runs(FD=25.0, **{"IC-div": 4.0}),
               ("sketch", 10, "ada"): runs(FD=40.0, **{"IC-div": 4.5}),
               ("sketch", 10, "freezed"): runs(FD=45.0, **{"IC-div": 3.5}),
               ("sketch", 10, "ewc"): [{"FD": 200.0, "IC-div": 5.0}, {"FD": 100.0, "IC-div": 7.0}],  # mean 150, 6.0
               ("sketch", 10, "c3"): runs(FD=29.0),
               ("sketch", 10, "rssa"): runs(**{"geom err": 0.5}),
               ("sketch", 10, "difa"): runs(**{"IC-div": 8.0})}
    text = testbed.claims_markdown(results, grid_args())
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    fd = rows["lower FD than TGAN, TGAN+ADA, FreezeD and EWC at 10 shots"]
    assert "**does not hold** (1 seed, noise unknown)" in fd and "not better than tgan" in fd and "ewc 150 ± 71 (2)" in fd
    div = rows["higher diversity than TGAN, TGAN+ADA, FreezeD and EWC at 10 shots"]
    assert "**does not hold**" in div and "not better than ewc" in div  # a tie (6.0 against 6.0) is not better
    assert "**holds**" in rows["lower FD than CDC at 10 shots"]
    difa = rows["one-shot adaptation keeps more diversity than NADA and than fine-tuning from one image"]
    assert "not testable here yet" in difa and "nada (1 shots)" in difa and "tgan (1 shots)" in difa
    shots = rows["diversity grows with 1 -> 5 -> 10 shots while FreezeD and EWC stay below it"]  # IC-div10, not IC-div
    assert "**does not hold**" in shots and "cdc IC-div10 5 -> 6.5 -> 6" in shots and "not run: freezed (1 shots)" in shots
    rssa = rows["better structure preservation than CDC, at some cost of diversity"]  # one part fails, one is missing
    assert "**does not hold**" in rssa and "not better than cdc" in rssa and "not run: rssa (10 shots)" in rssa


def test_verdict_rule_counts_a_difference_only_beyond_twice_its_standard_error():
    verdict = testbed.verdict
    assert verdict((10.0, 1.0, 3), (7.0, 1.0, 3), False) == "holds"  # d 3 > 2 se = 1.63
    assert verdict((10.0, 1.0, 3), (9.0, 1.0, 3), False) == "within noise"
    assert verdict((7.0, 1.0, 3), (10.0, 1.0, 3), False) == "does not hold"
    assert verdict((7.0, 1.0, 3), (10.0, 1.0, 3), True) == "holds"  # lower is better: the sign turns
    assert verdict((10.0, 0.0, 1), (9.9, 1.0, 3), False) == "holds (1 seed, noise unknown)"
    assert verdict((9.0, 0.5, 2), (9.0, 0.0, 1), False) == "does not hold (1 seed, noise unknown)"  # a tie is not better
    combine = testbed.combine
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "holds (1 seed, noise unknown)"]) == "holds (1 seed, noise unknown)"
    assert combine(["holds", "within noise"]) == "within noise"
    assert combine(["within noise", None]) is None  # a missing run: not testable
    assert combine([None, "does not hold (1 seed, noise unknown)", "holds"]) == "does not hold (1 seed, noise unknown)"
    assert combine(["does not hold (1 seed, noise unknown)", "does not hold"]) == "does not hold"


def test_score_files_are_named_by_the_grid_and_read_back(tmp_path):
    args = grid_args(scores=str(tmp_path), schedule="paper")
    run = testbed.Run("difa", "sketch", 10, 2)  # one-shot whatever --shots says
    values = {"FD": 20.0, "IC-div": 5.0, "iters": 301, "s/iter": 0.3, "RT MSE": 0.2}
    testbed.write_scores(run, args, values, "abc", "2026-01-01")
    record = json.loads((tmp_path / "sketch-1shot-difa-s2-paper.json").read_text())
    assert record["scores"] == values and record["commit"] == "abc" and (record["shots"], record["seed"], record["n_eval"]) == (1, 2, 10)
    assert testbed.read_scores(run, args) == record
    assert testbed.read_scores(run, grid_args(scores=str(tmp_path), schedule="paper", n_eval=1000)) is None  # another measurement
    assert testbed.scores_path(testbed.Run("cdc", "sketch", 10, 1), grid_args(iter=7)) == os.path.join("s", "sketch-10shot-cdc-s1-7it.json")
    # scored again without its return leg, the same run (same testbed.json) keeps its round trip; another run does not
    assert testbed.write_scores(run, args, {"FD": 21.0, "iters": 301, "s/iter": 0.3}, "abc", "d")["RT MSE"] == 0.2
    assert "RT MSE" not in testbed.write_scores(run, args, {"FD": 21.0, "iters": 301, "s/iter": 0.4}, "abc", "d")


def test_backfill_writes_a_score_file_per_run_row_of_a_one_seed_table(tmp_path):
    rule = "|---|" + "---:|" * 10
    table = tmp_path / "results-paper.md"
    table.write_text("Testbed, schedule paper, seeds [1], 1000 latents.\n\n### sketch, 10 shots\n\n"
                     "| run | FD | IC-div | geom err | p(target) | iters | s/iter |\n" + rule + "\n"
                     "| target renders | 0.41 | 6.79 |  | 1 |  |  |\n| cdc | 19.5 | 5.26 | 0.416 | 0.999 | 5002 | 0.625 |\n"
                     "| rssa | stopped |\n\nNot run yet: c3.\n\n### sketch, 5 shots\n\n"
                     "| run | FD | IC-div | IC-div10 | geom err | p(target) | iters | s/iter | RT MSE | RT cos | RT geom |\n" + rule + "\n"
                     "| cdc | 24 | 5.98 | 5.18 | 0.47 | 0.998 | 5002 | 0.298 | 0.232 | 0.838 | 0.623 |\n")
    args = testbed.parse_args(["--scores", str(tmp_path / "scores")])
    assert testbed.backfill(str(table), args) == 2  # not the reference row, not the error row
    args.schedule, args.n_eval = "paper", 1000
    ten = testbed.read_scores(testbed.Run("cdc", "sketch", 10, 1), args)
    assert ten["scores"] == {"FD": 19.5, "IC-div": 5.26, "geom err": 0.416, "p(target)": 0.999, "iters": 5002, "s/iter": 0.625, "IC-div10": 5.26}
    assert ten["commit"].startswith("unknown (backfilled from") and ten["trained"] == "unknown"
    assert testbed.read_scores(testbed.Run("cdc", "sketch", 5, 1), args)["scores"]["RT geom"] == 0.623
    table.write_text("Testbed, schedule paper, seeds [1, 2], 1000 latents.\n")
    with pytest.raises(common.UserError, match="one-seed"):
        testbed.backfill(str(table), args)


def test_reuse_builds_tables_claims_and_plot_from_score_files_without_run_folders(tmp_path, capsys):
    args = grid_args(scores=str(tmp_path / "scores"), schedule="paper")
    fd = {"cdc": [19.0, 20.0, 21.0], "c3": [18.0, 20.5, 21.5]}  # means 20 and 20: within noise
    for name, values in fd.items():
        for seed, value in enumerate(values, 1):
            for shots in (10, 5):
                testbed.write_scores(testbed.Run(name, "sketch", shots, seed), args,
                                     {"FD": value, "IC-div": 5.0, "IC-div10": 5.0 + shots / 10, "iters": 5002, "s/iter": 0.3}, "abc", "d")
    out = tmp_path / "out"
    testbed.main(["--reuse", "--schedule", "paper", "--methods", "cdc", "c3", "--shots", "10", "5", "--seeds", "1", "2", "3",
                  "--n-eval", "10", "--device", "cpu", "--work-dir", str(tmp_path / "runs"), "--scores", args.scores, "--out", str(out)])
    results = (out / "results-paper.md").read_text()
    assert "| cdc | 20 ± 1 (3) | 5 ± 0 (3) |" in results and "| c3 | 20 ± 1.8 (3) |" in results and "mean ± std (n)" in results
    assert "| 5002 | 0.3 ± 0 (3) |" in results  # an iteration count every seed shares reads once
    claims = (out / "claims.md").read_text()
    assert testbed.VERDICT_RULE in claims
    c3 = next(line for line in claims.splitlines() if "lower FD than CDC at 10 shots" in line)
    assert "**within noise**: FD c3 20 ± 1.8 (3); cdc 20 ± 1 (3) (within noise of cdc)" in c3
    assert (out / "icdiv_vs_shots-paper.png").exists() and not (out / "comparison-paper.png").exists()
    err = capsys.readouterr().err
    assert "the sample grids of c3, cdc not written: no run folder" in err
    assert "comparison-paper.png not written: no run folder and no picture" in err and "for c3, cdc (seed 1)" in err
    # each run's picture beside its score file: the figure needs no run folder either (seed 1's rows, most shots)
    for name, colour in (("cdc", 40), ("c3", 200)):
        row = np.full((36, 342, 3), colour, np.uint8)  # ten 32-px images with 2-px borders, as comparison_row makes them
        assert cv2.imwrite(testbed.pictures_path(testbed.Run(name, "sketch", 10, 1), args), row)
        assert (testbed.read_pictures(testbed.Run(name, "sketch", 10, 1), args) == colour).all()
    testbed.main(["--reuse", "--schedule", "paper", "--methods", "cdc", "c3", "--shots", "10", "5", "--seeds", "1", "2", "3",
                  "--n-eval", "10", "--device", "cpu", "--work-dir", str(tmp_path / "runs"), "--scores", args.scores, "--out", str(out)])
    figure = cv2.imread(str(out / "comparison-paper.png"))
    assert figure.shape[0] == 3 * 3 * 36  # source, cdc, c3, upscaled three times
    assert (figure[108:216, -1026:] == 40).all() and (figure[216:, -1026:] == 200).all()
    assert "not written: no run folder and no picture" not in capsys.readouterr().err


def test_the_committed_claims_are_what_reuse_builds_from_the_committed_score_files(tmp_path, capsys):
    """demo/results/claims.md, the run rows of results-paper.md and the comparison figure come from demo/results/scores
    alone (the docs' command)."""
    results_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "results")
    out = tmp_path / "out"
    testbed.main(["--reuse", "--schedule", "paper", "--styles", "sketch", "sunglasses", "--shots", "10", "5", "1", "--round-trip",
                  "--seeds", "1", "2", "3", "--methods", "cdc", "cdc_image", "cdc_patch", "cdc_nodist", "c3", "rssa", "progressive_asc",
                  "tgan", "ada", "freezed", "ewc", "difa", "nada", "--device", "cpu", "--work-dir", str(tmp_path / "runs"),
                  "--scores", os.path.join(results_dir, "scores"), "--out", str(out)])
    with open(os.path.join(results_dir, "claims.md"), encoding="utf-8") as f:
        assert (out / "claims.md").read_text(encoding="utf-8") == f.read()
    with open(os.path.join(results_dir, "results-paper.md"), encoding="utf-8") as f:
        committed = f.read()
    references = ("| target renders |", "| source (no adaptation) |")  # rendered and scored afresh, not from the files
    rows = [line for line in (out / "results-paper.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith(references)]
    assert len(rows) > 20 and all(line in committed.splitlines() for line in rows)
    # the comparison figure from the runs' pictures: every method's row as committed (the source row is drawn afresh)
    built, kept = (cv2.imread(str(path)) for path in (out / "comparison-paper.png", os.path.join(results_dir, "comparison-paper.png")))
    assert built.shape == kept.shape == (14 * 108, 1244, 3) and (built[108:] == kept[108:]).all()


def test_the_readme_and_the_docs_carry_the_committed_claims():
    """Their copies of demo/results/claims.md: the same rows (the README's without the paper's evidence; a style
    that ran nothing reads "not run" there)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def table(path, header):  # the table under the first line that starts with `header`, as lists of cells
        with open(os.path.join(root, path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[start:end]]

    claims = table("demo/results/claims.md", "| paper | claim | the paper's evidence")
    assert len(claims) >= 11 and table("docs/demo-and-testbed.md", "| paper | claim | the paper's evidence") == claims
    readme = table("README.md", "| paper | claim | testbed, sketch")
    assert len(readme) == len(claims)
    for ours, theirs in zip(readme[2:], claims[2:]):
        paper, claim, _, *styles = theirs
        assert ours == [paper, claim, *("not run" if c.startswith("not testable here yet: not run:") else c for c in styles)]


def test_line_plot_draws_each_series():
    image = testbed.line_plot({"cdc": [4.0, 5.0, 6.0], "freezed": [3.0, None, 3.5]}, [1, 5, 10], "IC-div vs shots", "IC-div")
    assert image.shape == (360, 560, 3) and image.dtype == np.uint8
    blue = (image[..., 0] > 150) & (image[..., 1] < 140) & (image[..., 2] < 60)  # cdc's colour, BGR (180, 119, 31)
    assert blue.sum() > 200


def test_testbed_rejects_a_shot_count_outside_the_demo_targets():
    with pytest.raises(common.UserError, match="--shots"):
        testbed.parse_args(["--shots", "11"])
