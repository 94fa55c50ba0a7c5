"""The CPU-scale world's judge (bksdm_lab/world/judge.py), the toy ablation recipe (experiments/toy_ablation) and its
notebook (notebooks/toy_ablation.ipynb).

Fast tier: a judge trained in seconds (judge.SHORT_JUDGE) in a cache folder of this module's own; FID in this world
and caption agreement on real renders. Slow tier: the short ablation end to end (short teacher, 1 seed x 2 variants x
a few steps, images generated and scored, the table) and the notebook executed on it.
"""

import csv
import json
import subprocess

import nbformat
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, subprocess_env

from bksdm_lab.world import judge as J
from bksdm_lab.world import scenes

RECIPE = REPO / "experiments" / "toy_ablation"
NOTEBOOK = REPO / "notebooks" / "toy_ablation.ipynb"


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("world_judge_cache")


@pytest.fixture(scope="module")
def short_judge(judge_cache):
    return J.load_judge(J.SHORT_JUDGE, judge_cache)


@pytest.fixture(scope="module")
def real_set():
    """300 renders of freshly sampled scenes (seeds the judge never trained on) and their captions."""
    scene_list = J.sample_scenes(300, seed=555)
    return J.render_scenes(scene_list, 32, seed=556), [scenes.caption(s) for s in scene_list]


def test_short_judge_beats_chance_and_is_cached(short_judge, judge_cache, monkeypatch):
    judge, report = short_judge
    acc, chance = report["held_out_accuracy"], report["chance"]
    # the easy attributes are learned in seconds, far above chance (1/6, 1/2, 1/5, 1/3, 1/2)
    for attr in ("colour", "size", "position", "count", "background"):
        assert acc[attr] >= chance[attr] + 0.3, (attr, acc)
    # shape (a 2-px small shape at 32 px) is learned last: the full judge gets it (docs/world.md), the short one need not
    assert acc["shape"] >= chance["shape"] - 0.05
    folder = J.judge_dir(J.SHORT_JUDGE, judge_cache)
    assert report["path"] == str(folder)
    assert folder.parent == judge_cache / "world" and folder.name == f"judge-{J.SHORT_JUDGE.key()}"
    assert json.loads((folder / "judge.json").read_text())["held_out_accuracy"] == acc
    # a second load reads the cache: same weights, no training
    monkeypatch.setattr(J, "train_judge", lambda *a, **k: pytest.fail("trained again"))
    again, _ = J.load_judge(J.SHORT_JUDGE, judge_cache)
    for a, b in zip(judge.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # another setting is another folder
    assert J.JudgeConfig().key() != J.SHORT_JUDGE.key()


def test_judge_training_is_seeded():
    cfg = J.JudgeConfig(width=4, features=8, train_images=64, test_images=16, epochs=1, batch_size=32)
    (a, ra), (b, rb) = J.train_judge(cfg), J.train_judge(cfg)
    assert ra["held_out_accuracy"] == rb["held_out_accuracy"]
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_load_judge_refuses_a_foreign_folder(tmp_path):
    folder = J.judge_dir(J.SHORT_JUDGE, tmp_path)
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("not a judge")
    with pytest.raises(RuntimeError, match="holds no judge.pt"):
        J.load_judge(J.SHORT_JUDGE, tmp_path)
    assert (folder / "mine.txt").read_text() == "not a judge"


def test_fid_in_this_world(short_judge, real_set):
    judge, _ = short_judge
    images, _ = real_set
    reference = J.reference_images(300, 32)
    assert reference.dtype == torch.uint8 and reference.shape == (300, 3, 32, 32)
    same = J.fid_against(judge, reference, reference)
    real = J.fid_against(judge, images, reference)  # other scenes, other jitter: only sampling noise apart
    noise = J.fid_against(judge, torch.randint(0, 256, images.shape, dtype=torch.uint8), reference)
    grey = J.fid_against(judge, torch.full(images.shape, 128, dtype=torch.uint8), reference)
    assert abs(same) < 1e-3
    assert noise > 20 * real and grey > 20 * real, (real, noise, grey)
    # a batch-size change does not change it; other sizes are resized to the judge's
    assert J.fid_against(judge, images, reference, batch_size=7) == pytest.approx(real, rel=1e-6, abs=1e-6)
    big = torch.nn.functional.interpolate(images.float(), size=64, mode="nearest").to(torch.uint8)
    assert J.fid_against(judge, big, reference) < noise / 10
    # torchmetrics took the judge's own width from num_features
    assert J.JudgeFeatures(judge)(images[:3]).shape == (3, J.SHORT_JUDGE.features)


def test_agreement_of_real_renders_with_their_captions(short_judge, real_set):
    judge, report = short_judge
    images, captions = real_set
    own = J.agreement(judge, images, captions)
    for attr in ("colour", "position", "count", "background"):
        assert own[attr] >= 0.85, (attr, own)
    assert own["size"] >= 0.75, own  # small (radius 0.10) and large (0.14): the short judge's second-hardest
    assert set(own) == {*scenes.ATTRIBUTES, "all"}
    # the same images against captions of other scenes: agreement falls to about chance
    rng = np.random.default_rng(0)
    shuffled = [captions[i] for i in rng.permutation(len(captions))]
    other = J.agreement(judge, images, shuffled)
    assert other["position"] < 0.5 and other["colour"] < 0.5 and other["all"] < own["all"] / 2 + 0.01, other
    # `all` is the fraction with every attribute right: at most the worst attribute
    assert own["all"] <= min(own[a] for a in scenes.ATTRIBUTES) + 1e-9
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        J.agreement(judge, images[:3], captions[:2])
    with pytest.raises(ValueError, match="not a caption of the world"):
        J.agreement(judge, images[:1], ["a photo of a cat"])


def test_score_folder_reads_generate_and_world_layouts(short_judge, tmp_path):
    judge, _ = short_judge
    world = scenes.write_world(tmp_path / "world", num_images=24, seed=3, size=32)
    reference = J.reference_images(64, 32)
    from_world = J.score_folder(judge, world, reference)
    assert from_world["n"] == 24 and set(from_world) == {
        "n",
        "fid",
        *(f"agree/{a}" for a in (*scenes.ATTRIBUTES, "all")),
    }
    # generate's layout: images/<i>.png + prompts.csv
    images, prompts = J.read_folder(world)
    gen = tmp_path / "gen"
    (gen / "images").mkdir(parents=True)
    with (gen / "prompts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file_name", "text"])
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            image.save(gen / "images" / f"{i:05d}.png")
            w.writerow([i, f"{i:05d}.png", prompt])
    from_gen = J.score_folder(judge, gen, reference)
    assert from_gen == pytest.approx(from_world)
    (gen / "images" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images listed"):
        J.score_folder(judge, gen, reference)
    with pytest.raises(FileNotFoundError, match="neither prompts.csv"):
        J.read_folder(tmp_path)


def test_judge_command_line(judge_cache, tmp_path, capsys):
    world = scenes.write_world(tmp_path / "world", num_images=16, seed=4, size=32)
    out = tmp_path / "scores.json"
    code = J.main(
        [
            "score",
            str(world),
            "--judge",
            "short",
            "--cache-dir",
            str(judge_cache),
            "--reference",
            "64",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert f"judge: {J.judge_dir(J.SHORT_JUDGE, judge_cache)}" in text
    assert "held-out accuracy: colour=" in text and "real renders: n=16 fid=" in text
    scores = json.loads(out.read_text())["scores"]
    assert set(scores) == {str(world), "real renders"}
    with pytest.raises(SystemExit):
        J.main(["score", "--judge", "short", "--cache-dir", str(judge_cache)])
    with pytest.raises(SystemExit):
        J.main(["--judge", "tiny"])
    assert "invalid choice: 'tiny'" in capsys.readouterr().err
    # the fixed prompt set, for `python -m bksdm_lab.generate prompts_file=...`: no judge is trained for it
    assert J.main(["prompts", "--num", "5", "--cache-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out.splitlines() == J.world_prompts(5) and not (tmp_path / "none").exists()


def test_prediction_distils_the_best_and_worst_ranked_layers_of_one_size_and_says_if_the_ranking_held():
    import sys

    sys.path.insert(0, str(RECIPE))
    import prediction

    keep = {"down": [[0], [0]], "up": [[0], [0]], "mid": True}
    layers = [{"layer": "baseline", "rank": None, "params": 10}]
    layers += [
        {"layer": f"l{i}", "rank": 7 - i, "params": 8, "drop": i / 10, "keep": json.dumps(keep)}
        for i in (1, 2, 3, 5, 6)
    ]
    layers += [{"layer": "mid_block", "rank": 3, "params": 9, "drop": 0.4, "keep": json.dumps(keep)}]
    best, worst = prediction.pick(layers)  # best: without the layers that matter least (rank 1 matters most)
    assert [r["layer"] for r in best + worst] == ["l1", "l2", "l5", "l6"]  # the size group of five, not mid_block
    names = prediction.patterns(best, worst)
    assert names["without_l1"]["overrides"] == [
        "arch=keep", "arch.keep.down=[[0],[0]]", "arch.keep.up=[[0],[0]]", "arch.keep.mid=true"
    ]  # fmt: skip
    record = {"settings": {"rank_by": "agree/all", "lower_is_better": False, "teacher": "world", "prompts": ["p"]}}
    record["layers"] = layers

    def scores(values):
        return [{"model": m, "agree/all": str(v)} for m, vs in zip(names, values) for v in vs]

    held = prediction.verdict(record, names, scores([[0.9, 0.8], [0.7, 0.75], [0.5, 0.6], [0.4, 0.3]]))
    assert held[-1].startswith("- the ranking held after distillation: yes") and "seed ranges apart" in held[-1]
    assert "| best-ranked: without l1 (importance rank 6) | 6 | 0.100 | 0.850 [0.800, 0.900] | 2 |" in held
    failed = prediction.verdict(record, names, scores([[0.9], [0.5], [0.6], [0.4]]))
    assert failed[-1].startswith("- the ranking held after distillation: no")
    with pytest.raises(SystemExit, match="no four removable layers of one size"):
        prediction.pick(layers[:3])


# ---- slow: the short ablation end to end, then the notebook on it --------------------------------------------------
SHORT_TEACHER = ["data.num_images=16", "vae.steps=2", "unet.steps=2", "samples.prompts=0"]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def _run(args, env, cwd, timeout=600):
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{args}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_short_ablation_and_notebook(judge_cache, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    world_cache = tmp_path / "cache"  # the short teacher's data and the students' world set: not the demo's cache
    env = subprocess_env(world_cache)
    teacher = tmp_path / "teacher"
    _run([PYTHON, "-m", "bksdm_lab.world.teacher", *SHORT_TEACHER, f"out={teacher}"], env, tmp_path)
    out = tmp_path / "ablation"
    overrides = [f"teacher.pretrained={teacher}", "data.synthetic.num_images=16", "data.batch_size=8"]
    _run([PYTHON, str(RECIPE / "ablation.py"), "--short", "--out", str(out), "--", *overrides], env, tmp_path)
    collect = _run(
        [
            PYTHON,
            str(RECIPE / "collect.py"),
            "--short",
            "--out",
            str(out),
            "--prompts",
            "8",
            "--cache-dir",
            str(judge_cache),
        ],
        env,
        tmp_path,
    )
    assert "teacher init beats random init" not in collect.stdout  # random_init is not in the short version
    # both variants trained 4 steps and were scored; their wall times recorded
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"], r["returncode"]) for r in runs) == [
        ("bksdm", "0", "0"),
        ("task_only", "0", "0"),
    ]
    assert all(float(r["wall_s"]) > 0 for r in runs)
    with (out / "scores.csv").open() as f:
        scores = {r["model"]: r for r in csv.DictReader(f)}
    assert set(scores) == {"bksdm", "task_only", "teacher", "real renders"}
    for row in scores.values():
        assert row["n"] == "8" and np.isfinite(float(row["fid"])) and 0 <= float(row["agree/all"]) <= 1
    for variant in ("bksdm", "task_only"):
        assert np.isfinite(float(scores[variant]["task_loss_end"]))
        images = sorted((out / "runs" / variant / "seed0" / "world_eval" / "images").glob("*.png"))
        assert len(images) == 8
    table = (out / "table.md").read_text()
    assert "| bksdm (teacher init, task + out_kd + feat_kd (BK-SDM)) | 1 |" in table
    assert "| teacher (upper bound) |" in table and "| real renders (judge's ceiling) |" in table
    assert "output KD beats the task loss alone" not in table  # task_out_kd is not in the short version
    with (out / "table.csv").open() as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["bksdm", "task_only", "teacher", "real renders"]
    # the per-layer feature-KD values were logged by the run with feature KD, not by the task-only one
    header = (out / "runs" / "bksdm" / "seed0" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/feat_kd/up_blocks.0" in header
    assert "train/feat_kd/" not in (out / "runs" / "task_only" / "seed0" / "csv" / "metrics.csv").read_text()

    # the notebook, run from notebooks/ on this ablation, with the short teacher's block importance beside it (the
    # prediction check's distillations are the ablation's own runs: its verdict is tested above, in-process)
    from test_generate import compose

    from bksdm_lab import importance

    importance.run(compose("importance", [
        "teacher=world", f"teacher.pretrained={teacher}", "num_prompts=4", "sampling.steps=2", "sampling.guidance=1.75",
        "world.judge=short", "world.reference=32", f"world.cache_dir={judge_cache}", "budget.params=null",
        "score_proposals=false", f"out={out / 'importance'}",
    ]))  # fmt: skip
    (out / "prediction.md").write_text("ranking held: 2 of 2 layers\n")
    monkeypatch.setenv("TOY_ABLATION_DIR", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own (inline) backend puts figures in the outputs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    texts, images = [], []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o.output_type != "error", o
            if o.output_type == "stream":
                texts.append(o.text)
            elif "image/png" in o.get("data", {}):
                images.append(cell.source)
    text = "".join(texts)
    assert f"ablation: {out}" in text and "variants: bksdm, task_only" in text
    assert "train/loss_task: 2 variants, 4 logged steps" in text
    assert "bksdm: 6 feat_kd layers: down_blocks.0," in text and "task_only: no feat_kd per-layer columns" in text
    assert "samples grid columns: real render | teacher | bksdm s0 | task_only s0" in text
    assert "| teacher (upper bound) |" in text
    assert "# Layer importance: world teacher" in text and "| 1 | " in text and "ranking held: 2 of 2 layers" in text
    assert "no block importance" not in text
    # one figure each: the curves, the per-layer curves, the samples grid, the importance chart
    assert len(images) == 4
    assert "train/loss_task" in images[0] and "layer_columns" in images[1]
    assert "results.samples" in images[2] and "importance.png" in images[3]
