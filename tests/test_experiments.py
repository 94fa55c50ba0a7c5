"""Every recipe in experiments/ composes without running, and each row of the paper table gets what it promises.

Every `python -m bksdm_lab.train ...` command in experiments/README.md, experiments/*.sh, README.md and docs/ is
parsed with Hydra's own override parser, expanded (each value of a `-m` sweep, each allowed value of a script's shell
variable) and composed from conf/ with `compose(config_name="train", return_hydra_config=True)`; no run starts.
"""

import itertools
import re
import shlex

import pytest
from conftest import CONF, REPO
from omegaconf import OmegaConf

from bksdm_lab.evaluation.paper import PAPER_RESULTS

EXPERIMENTS = REPO / "experiments"
README = EXPERIMENTS / "README.md"
GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = sorted(EXPERIMENTS.glob("*.sh"))
GROUPS = ("experiment", "arch", "teacher", "trainer", "data", "loss", "module", "optimizer", "logger", "callbacks")
GROUPS += ("sampling", "paths", "hparams_search")
ENTRY = "python -m bksdm_lab.train"
# The values a script's shell variable may take (a script that uses another variable fails the test).
SHELL_VARIABLES = {"arch": sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))}
NO_NUMBERS = "see the paper's ablation table"
# The paper's -2M models and the v2 models, their data and teacher.
DATA_ROOT = {False: "preprocessed_212k", True: "preprocessed_2256k"}
TEACHER = {False: "sd14", True: "sd21base"}
# An ablation row's label -> what its composed config must hold.
ABLATIONS = {
    "full recipe": {"arch.init": "teacher", "loss.weights.feat_kd": 1, "loss.weights.out_kd": 1},
    "no feature KD": {"arch.init": "teacher", "loss.weights.feat_kd": 0, "loss.weights.out_kd": 1},
    "no output KD": {"arch.init": "teacher", "loss.weights.feat_kd": 1, "loss.weights.out_kd": 0},
    "random init": {"arch.init": "random", "loss.weights.feat_kd": 1, "loss.weights.out_kd": 1},
}


def commands(path) -> list[str]:
    """The text from `python -m bksdm_lab.train` to the end of its backtick span or its line of a ```bash block
    (markdown; a line ending in `\\` goes on) or its line (scripts)."""
    text = path.read_text()
    if path.suffix == ".md":
        spans = re.findall(r"`([^`\n]*)`", text)
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        spans += [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    else:
        spans = text.splitlines()
    return [s[s.index(ENTRY) :].split("#")[0].strip() for s in spans if ENTRY in s]


def arguments(command: str) -> list[str]:
    """The command's Hydra arguments: shell-split, without `-m` and a script's `"$@"`."""
    assert command.startswith(ENTRY), command
    return [t for t in shlex.split(command)[len(ENTRY.split()) :] if t not in ("-m", "--multirun", "$@")]


def substitutions(args: list[str]) -> list[list[str]]:
    """One argument list per combination of the allowed values of the shell variables it uses."""
    names = sorted({n for a in args for n in re.findall(r"\$\{?(\w+)\}?", a)})
    unknown = [n for n in names if n not in SHELL_VARIABLES]
    assert not unknown, f"shell variables {unknown} in {args}: add their allowed values to SHELL_VARIABLES"
    out = []
    for values in itertools.product(*(SHELL_VARIABLES[n] for n in names)):
        env = dict(zip(names, values, strict=True))
        out.append([re.sub(r"\$\{?(\w+)\}?", lambda m, env=env: env[m.group(1)], a) for a in args])
    return out


def runs(args: list[str]) -> list[list[str]]:
    """The jobs a (multi)run of these overrides starts: every combination of the values of its sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        if override.is_sweep_override():
            assert override.is_discrete_sweep(), f"{override.input_line}: only a list or range sweep composes here"
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def check_overrides_applied(cfg, overrides: list[str]) -> None:
    """Each group choice is the chosen option; each plain `key=value` holds that value in the composed config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = cfg.hydra.runtime.choices
    for override in OverridesParser.create().parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        if override.is_delete() or override.is_hydra_override():
            continue
        if key in GROUPS:
            assert choices[key] == value, f"{key}={value}: composed {choices[key]}"
            if key == "experiment" and not choices.get("hparams_search"):
                assert cfg.experiment_name == value  # the W&B group is the recipe's name (a search names its own)
            elif key == "arch":
                assert cfg.arch.name == value
            elif key == "trainer" and value == "ddp":
                assert cfg.trainer.strategy == "ddp"
        else:
            assert OmegaConf.select(cfg, key) == value, f"{key}={value}: composed {OmegaConf.select(cfg, key)}"


README_COMMANDS = commands(README)
SCRIPT_COMMANDS = [(p.name, c) for p in SCRIPTS for c in commands(p)]
GUIDE_COMMANDS = [(str(p.relative_to(REPO)), c) for p in GUIDES for c in dict.fromkeys(commands(p))]
ALL_COMMANDS = [("experiments/README.md", c) for c in README_COMMANDS] + SCRIPT_COMMANDS + GUIDE_COMMANDS


def table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header begins with `header_start`, as {column: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


PAPER_ROWS = table(README.read_text(), "| model | command |")


def row_model(row: dict) -> tuple[str, bool, bool]:
    """(arch, v2, 2M) of a row's paper model name."""
    m = re.search(r"BK-SDM-(v2-)?(Base|Small|Tiny)(-2M)?", row["model"])
    assert m, row["model"]
    return m.group(2).lower(), bool(m.group(1)), bool(m.group(3))


def row_ablation(row: dict) -> str | None:
    if not row["model"].startswith("ablation:"):
        return None
    found = [name for name in ABLATIONS if name in row["model"]]
    assert len(found) == 1, row["model"]
    return found[0]


# ---- the paper table -------------------------------------------------------------------------------


def test_the_paper_table_has_every_paper_model_and_every_ablation():
    models = [row["model"] for row in PAPER_ROWS if not row_ablation(row)]
    assert sorted(models) == sorted(m for m in PAPER_RESULTS if m.startswith("BK-SDM"))
    assert sorted(filter(None, map(row_ablation, PAPER_ROWS))) == sorted(ABLATIONS)
    assert {(row_model(r)[0], row_model(r)[1:]) for r in PAPER_ROWS if not row_ablation(r)} == {
        (arch, variant)
        for arch in ("base", "small", "tiny")
        for variant in ((False, False), (False, True), (True, False))
    }


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda r: r["model"])
def test_paper_row_numbers_are_the_papers(row):
    cells = (row["FID"], row["IS"], row["CLIP"])
    if row_ablation(row):
        assert cells == (NO_NUMBERS,) * 3  # the ablation numbers are not in our sources
    else:
        assert tuple(float(c) for c in cells) == PAPER_RESULTS[row["model"]]
    cost = row["expected cost"]
    assert "(paper)" in cost or "(derived)" in cost or "no figure in our sources" in cost, cost


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda r: r["model"])
def test_paper_row_composes_to_what_it_promises(row, monkeypatch):
    monkeypatch.setenv("BKSDM_DATA_DIR", "/data/laion_aes")
    command = re.fullmatch(r"`([^`]+)`", row["command"]).group(1)
    jobs = [job for args in substitutions(arguments(command)) for job in runs(args)]
    assert len(jobs) == 1, f"{command}: one run per row"
    cfg = compose_train(jobs[0])
    check_overrides_applied(cfg, jobs[0])
    arch, v2, two_m = row_model(row)
    assert cfg.arch.name == arch
    assert cfg.teacher.name == TEACHER[v2]
    assert cfg.data.root == f"/data/laion_aes/{DATA_ROOT[two_m]}"
    assert cfg.experiment_name == row["W&B group"].strip("`")
    # the paper's recipe: 50K steps of 256 images (v2: 128), AdamW 5e-5, fp16 mixed precision
    assert cfg.trainer.max_steps == 50_000
    assert cfg.data.global_batch_size == (128 if v2 else 256)  # accumulation derived from it and the devices
    assert cfg.data.global_batch_size % cfg.data.batch_size == 0
    assert cfg.optimizer.lr == 5e-5 and cfg.trainer.precision == "16-mixed"
    expected = ABLATIONS[row_ablation(row) or "full recipe"]
    assert {k: OmegaConf.select(cfg, k) for k in expected} == expected
    assert cfg.loss.weights.task == 1


# ---- every command -----------------------------------------------------------------------------------


def test_readme_covers_the_recipes():
    assert len(README_COMMANDS) >= 6
    composed = {tuple(job) for c in README_COMMANDS for args in substitutions(arguments(c)) for job in runs(args)}
    seen = {o for job in composed for o in job}
    for experiment in ("demo", "paper", "paper_2m", "paper_v2", "ablation"):
        assert f"experiment={experiment}" in seen
    for arch in ("base", "small", "tiny"):
        assert f"arch={arch}" in seen
    assert "trainer=ddp" in seen
    assert any("-m" in shlex.split(c) for c in README_COMMANDS), "a multirun example"
    assert {"demo.sh", "paper.sh", "paper_2m.sh", "paper_v2.sh"} <= {p.name for p in SCRIPTS}
    assert {name for name, _ in SCRIPT_COMMANDS} == {p.name for p in SCRIPTS}


def test_sweeps_and_shell_variables_expand_into_every_job():
    assert runs(arguments("python -m bksdm_lab.train -m experiment=demo arch=base,small loss.weights.feat_kd=0,1")) == [
        ["experiment=demo", "arch=base", "loss.weights.feat_kd=0"],
        ["experiment=demo", "arch=base", "loss.weights.feat_kd=1"],
        ["experiment=demo", "arch=small", "loss.weights.feat_kd=0"],
        ["experiment=demo", "arch=small", "loss.weights.feat_kd=1"],
    ]
    assert substitutions(arguments('python -m bksdm_lab.train experiment=paper arch="$arch" "$@"')) == [
        ["experiment=paper", f"arch={a}"]
        for a in ("base", "keep", "same", "small", "tiny")  # keep: the pattern template; same: the teacher's
    ]
    with pytest.raises(AssertionError, match="SHELL_VARIABLES"):
        substitutions(["teacher=$teacher"])


@pytest.mark.parametrize(("source", "command"), ALL_COMMANDS, ids=[f"{s}: {c}" for s, c in ALL_COMMANDS])
def test_command_composes(source, command):
    """Hydra accepts every override of every job the command starts, and the composed config holds it."""
    groups = [(g, o) for a in arguments(command) for g, _, o in [a.lstrip("+~").partition("=")] if g in GROUPS]
    for group, options in groups:
        for option in options.split(","):
            if "$" not in option:
                assert (CONF / group / f"{option}.yaml").is_file(), f"{source}: no conf/{group}/{option}.yaml"
    for args in substitutions(arguments(command)):
        for job in runs(args):
            check_overrides_applied(compose_train(job), job)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_executable_and_passes_args_through(script):
    text = script.read_text()
    assert text.startswith("#!"), script
    assert "set -euo pipefail" in text
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    assert '"$@"' in text
    for default in re.findall(r"\$\{1:-([\w-]+)\}", text):  # the scripts' default arch
        assert (CONF / "arch" / f"{default}.yaml").is_file(), default
