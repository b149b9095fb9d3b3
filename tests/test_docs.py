"""The README and docs/ say only true things about the repository's files, names and flags.

Every relative link resolves (anchors to a heading of the page linked), every
``scripts/``, ``configs/``, ``ablations/`` and ``benchmarks/`` path named exists,
every dotted ``nucleiseg.`` name imports or resolves, and every flag given to a
script in a command is one that script's parser knows.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|configs|ablations|benchmarks)/[\w./*-]*)")
DOTTED = re.compile(r"(?<![\w.])nucleiseg(?:\.\w+)+")
SCRIPT_CALL = re.compile(r"(?<![\w./-])scripts/(\w+)\.py((?:[ \t]+(?:\\\n[ \t]*)?[^\s`|;&)#]+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text outside code blocks and code spans, where links and headings live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(_prose(page.read_text()))
        if not re.match(r"[a-z]+:", target)  # http(s), mailto: not checked here
    ]


def test_the_slug_matches_githubs():
    assert slug("U-Net++: the semantic route") == "u-net-the-semantic-route"
    assert slug("The `--fast` preset") == "the---fast-preset"
    assert slug("Status when the package was grouped by stage (a0f29e5)") == (
        "status-when-the-package-was-grouped-by-stage-a0f29e5"
    )


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_named_repository_path_exists(page):
    missing = []
    for name in set(REPO_PATH.findall(page.read_text())):
        name = name.rstrip(".")
        if not (list(ROOT.glob(name)) if "*" in name else (ROOT / name).exists()):
            missing.append(name)
    assert not missing, sorted(missing)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_dotted_package_name_resolves(page):
    names = set(DOTTED.findall(page.read_text()))
    assert not [name for name in sorted(names) if not _resolves(name)]


def _script_flags() -> dict[str, set[str]]:
    flags = {}
    for page in PAGES:
        for name, rest in SCRIPT_CALL.findall(page.read_text()):
            flags.setdefault(name, set()).update(FLAG.findall(rest))
    return flags


@pytest.mark.parametrize("script", sorted(_script_flags()))
def test_every_flag_given_to_a_script_is_one_it_takes(script):
    parser = importlib.import_module(f"scripts.{script}").get_args_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    assert not sorted(_script_flags()[script] - known)


def test_the_readme_is_a_front_page_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < MAX_README_LINES
    commands = FENCE.search(readme).group(0).splitlines()[1:-1]
    assert "scripts/quickstart.py" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert commands[1] == ci[-1]
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name}" in readme, f"README does not link {page.name}"


def test_the_layout_the_architecture_page_draws_is_the_package():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "src" / "nucleiseg"
    for module in package.glob("[!_]*.py"):
        assert f"`{module.name}`" in text, f"{module.name} missing"
    for stage in (p for p in package.iterdir() if (p / "__init__.py").exists()):
        assert f"{stage.name}/" in text
        for module in stage.glob("[!_]*.py"):
            assert f"`{module.name}`" in text, f"{stage.name}/{module.name} missing"
    assert "tests/test_architecture.py" in text


def test_shell_commands_in_the_docs_are_well_formed():
    """Every ``bash`` block splits into words (no unbalanced quotes) after its continuations."""
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                shlex.split(line, comments=True)


# Leaderboards that score saved OOF label images only, never a model: naming a run there
# does not need its weights.
OOF_ONLY_LEADERBOARDS = {"training.yaml", "reported.yaml"}


def test_every_committed_run_weight_is_read_by_a_documented_command():
    """A run's weights are committed only where a command in the docs or a leaderboard
    that runs models reads them; the others keep their OOF labels, configs and epoch CSVs."""
    tracked = subprocess.run(
        ["git", "ls-files", "runs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    weighted = {p.split("/")[1] for p in tracked if re.search(r"/weights_\w+\.pt$", p)}
    assert weighted, "no committed run weights found: is this a git checkout?"
    readers = [*PAGES, *(ROOT / "ablations").glob("*.yaml")]
    text = "\n".join(p.read_text() for p in readers if p.name not in OOF_ONLY_LEADERBOARDS)
    unread = [r for r in sorted(weighted) if not re.search(rf"runs/{r}(?![\w])", text)]
    assert not unread, unread


# Commands that run a run's models, by how they name the runs: the words after --runs, the
# word after --from, or the first argument (tune_postprocess.py predicts its OOF outputs
# again when they are not there, and they are never committed).
READ_AFTER_RUNS = {"predict", "evaluate_external", "export_weights"}
READ_AFTER_FROM = {"finetune", "adapt"}
READ_FIRST_ARGUMENT = {"tune_postprocess"}
RUN_WORD = re.compile(r"^(runs/[\w.-]+(?:/fold\d+)?)/?$")
LOAD_RUN = re.compile(r"(?<![\w./-])(runs/[\w.-]+(?:/fold\d+)?)")
RESTORE = re.compile(r"git checkout ([0-9a-f]{7,40}) -- ([^`\n]+)")
WEIGHTS_FILE = re.compile(r"/weights_\w+\.pt$")


def runs_whose_models_a_page_runs(text: str) -> set[str]:
    """The run or fold folders a page's commands load models from (a placeholder such as
    ``runs/<run>`` is no folder)."""
    found = set()
    for name, rest in SCRIPT_CALL.findall(text):
        words = rest.replace("\\\n", " ").split()
        named = []
        if name in READ_AFTER_RUNS and "--runs" in words:
            for word in words[words.index("--runs") + 1 :]:
                if word.startswith("-"):
                    break
                named.append(word)
        elif name in READ_AFTER_FROM and "--from" in words:
            named = words[words.index("--from") + 1 :][:1]
        elif name in READ_FIRST_ARGUMENT:
            named = words[:1]
        found.update(m.group(1) for m in map(RUN_WORD.match, named) if m)
    for line in text.splitlines():
        if "nucleiseg.load(" in line:
            found.update(LOAD_RUN.findall(line))
    return found


def _weighted(run: str, files: list[str]) -> bool:
    return any(f.startswith(f"{run}/") and WEIGHTS_FILE.search(f) for f in files)


def _restored(run: str, paths: list[str]) -> bool:
    return any(run == p or run.startswith(f"{p}/") or p.startswith(f"{run}/") for p in paths)


TRAIN_CONFIG = re.compile(r"scripts/train\.py --config (\S+\.yaml)")


def runs_a_page_trains(text: str) -> set[str]:
    """``runs/<experiment>`` of every ``scripts/train.py --config FILE`` on a page (the run
    folder that command writes, named by the file's ``experiment``)."""
    runs = set()
    for config in TRAIN_CONFIG.findall(text):
        experiment = yaml.safe_load((ROOT / config).read_text()).get("experiment")
        if experiment:
            runs.add(f"runs/{experiment}")
    return runs


def unweighted_runs_in_commands(tracked: list[str]) -> list[str]:
    """The page commands that run a run's models whose weights ``tracked`` lacks, unless the
    page trains that run itself (``scripts/train.py --config``) or gives the
    ``git checkout <commit> -- runs/<name>`` that restores them (checked against that
    commit where this clone has it)."""
    problems = []
    for page in PAGES:
        text = page.read_text()
        restores = [(commit, paths.split()) for commit, paths in RESTORE.findall(text)]
        trained = runs_a_page_trains(text)
        for run in sorted(runs_whose_models_a_page_runs(text)):
            if _weighted(run, tracked) or run.split("/fold")[0] in trained:
                continue
            commits = [(c, paths) for c, paths in restores if _restored(run, paths)]
            if not commits:
                problems.append(f"{_page_id(page)}: {run} has no committed weights")
            for commit, paths in commits:
                listed = subprocess.run(
                    ["git", "ls-tree", "-r", "--name-only", commit, "--", *paths],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                # A clone without the commit (a shallow one) cannot check it.
                if listed.returncode == 0 and not _weighted(run, listed.stdout.split()):
                    problems.append(f"{_page_id(page)}: {commit} holds no weights of {run}")
    return problems


def test_the_runs_a_page_names_in_commands_are_found():
    text = (
        "`.venv/bin/python scripts/predict.py --runs runs/a runs/b/fold1 --tta flip --out x`\n"
        "`scripts/tune_postprocess.py runs/c --folds 3`, `scripts/evaluate_oof.py runs/d`,\n"
        "`scripts/finetune.py --images DIR --from runs/e/fold0 --out-dir runs/f`\n"
        'model = nucleiseg.load("weights")  # or "runs/g", "runs/<run>"\n'
    )
    found = runs_whose_models_a_page_runs(text)
    assert found == {"runs/a", "runs/b/fold1", "runs/c", "runs/e/fold0", "runs/g"}


def test_a_page_that_trains_a_run_may_use_it_without_committed_weights():
    text = (
        "`python scripts/train.py --config configs/unetpp_generalized_ft_bitdepth.yaml --fold all`"
    )
    assert runs_a_page_trains(text) == {"runs/unetpp_effb0_generalized_ft_bitdepth"}


def test_every_run_a_documented_command_runs_has_committed_weights():
    """The converse of the test above: a page command never runs the models of a run whose
    weights are not committed (a run kept for its OOF labels, configs and epoch CSVs),
    unless that page says which commit brings them back."""
    tracked = subprocess.run(
        ["git", "ls-files", "runs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not unweighted_runs_in_commands(tracked)
