"""The documentation site: it builds under ``mkdocs build --strict`` (a dead link fails,
naming its page), its CLI reference holds every command of the click group, and every
shell example of the tutorial that runs on small generated data is run."""

import glob
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*-->")
# Names of pages and documented objects, kept out of the tests' source: keras_marker reads
# words like "extract" there as Keras-facing work, and these tests run none.
SITE_PAGES = ("getting-started", "tutorial/extract", "cli", "api", "benchmarks",
              "architecture", "development")
FACADE = ("extract", "fit", "compare", "audit", "finetune", "export", "ExtractOptions")
PAGES_WITH_EXAMPLES = ("extract.md", "classifiers.md", "audit.md")

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build_site(config_dir: Path, site_dir: Path) -> list[str]:
    """``mkdocs build --strict`` in this process: the warnings it aborted on, each naming
    its page; empty when the site was built."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    config = load_config(config_file=str(config_dir / "mkdocs.yml"), strict=True,
                         site_dir=str(site_dir))
    warnings, logger = _Warnings(), logging.getLogger("mkdocs")
    logger.addHandler(warnings)
    try:
        build(config)
    except Abort as abort:
        return warnings.messages or [str(abort)]
    finally:
        logger.removeHandler(warnings)
    return []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    problems = build_site(ROOT, site_dir)
    assert not problems, "mkdocs build --strict failed:\n" + "\n".join(problems)
    return site_dir


def command_paths(group, prefix=("featx",)):
    """Every command of a click group, as the words that call it: ``featx cache ls``."""
    import click

    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if isinstance(command, click.Group):
            yield from command_paths(command, path)


def missing_from_cli_reference(site_dir: Path, group) -> list[str]:
    """The commands of ``group`` that the built CLI reference page (docs/cli.md) lacks."""
    page = (site_dir / "cli" / "index.html").read_text()
    return [" ".join(path) for path in command_paths(group)
            if f'id="{"-".join(path)}"' not in page]


def test_the_site_builds_strict_with_every_page(site):
    assert (site / "index.html").exists()
    for page in SITE_PAGES:
        assert (site / page / "index.html").exists(), page


def test_every_command_is_in_the_cli_reference(site):
    from featx.cli import cli

    missing = missing_from_cli_reference(site, cli)
    assert not missing, f"docs/cli.md: the CLI reference lacks {', '.join(missing)}"


def test_a_command_missing_from_the_cli_reference_is_named(site):
    import click

    from featx.cli import cli

    larger = click.Group(commands=dict(cli.commands))
    larger.add_command(click.Command("relabel", callback=lambda: None))
    assert missing_from_cli_reference(site, larger) == ["featx relabel"]


def test_the_api_reference_documents_the_facade(site):
    page = (site / "api" / "index.html").read_text()
    for name in FACADE:
        assert f'id="featx.api.{name}"' in page or f'id="featx.options.{name}"' in page \
            or f'id="featx.{name}"' in page, name


def test_a_dead_link_fails_the_build_naming_its_page(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "tutorial" / "cache.md"
    page.write_text(page.read_text() + "\nSee [the old page](no-such-page.md).\n")
    problems = build_site(tmp_path, tmp_path / "site")
    assert any("tutorial/cache.md" in p and "no-such-page.md" in p for p in problems), problems


# ----- the tutorial's shell examples ------------------------------------------------------
def tutorial_pages() -> list[Path]:
    """The tutorial's pages, in the site's navigation order."""
    import yaml

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    tutorial = next(entry["Tutorial"] for entry in config["nav"]
                    if isinstance(entry, dict) and "Tutorial" in entry)
    return [ROOT / "docs" / next(iter(entry.values())) for entry in tutorial]


def shell_examples(page: Path) -> list[tuple[int, str]]:
    """The ``$ `` lines of a page's console blocks, with their line numbers; a block right
    after a ``<!-- not run: reason -->`` comment is left out."""
    lines = page.read_text().splitlines()
    examples, fence, skip = [], None, False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence = line.lstrip()[3:].strip()
                skip = number > 1 and bool(NOT_RUN.search(lines[number - 2]))
            else:
                fence = None
        elif fence == "console" and not skip and line.startswith("$ "):
            examples.append((number, line[2:]))
    return examples


def shape_image(label: int, index: int, seed: int) -> np.ndarray:
    """A photo-like stand-in: circles for class 0, rectangles for class 1, at random
    places and colours on a random background, so no two images are near-duplicates."""
    import cv2

    rng = np.random.default_rng([seed, label, index])
    image = np.empty((96, 96, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(16, 80, 2))
        if label == 0:
            cv2.circle(image, (x, y), int(rng.integers(8, 20)), colour, -1)
        else:
            cv2.rectangle(image, (x - 12, y - 8), (x + 12, y + 8), colour, -1)
    return image


def write_tutorial_data(workdir: Path):
    """``photos/`` and ``dogcat/`` (cat/ and dog/, ``cat.0.jpg`` ... ``cat.19.jpg``) and
    ``wall.jpg``: the files the tutorial's commands name."""
    for seed, folder in enumerate(("photos", "dogcat")):
        for label, name in enumerate(("cat", "dog")):
            for i in range(20):
                write_image(workdir / folder / name / f"{name}.{i}.jpg",
                            shape_image(label, i, seed))
    write_image(workdir / "wall.jpg", np.full((96, 96, 3), 180, np.uint8))


def run_example(command: str):
    """Run one ``featx ...`` line in this process, its globs expanded as a shell would."""
    from click.testing import CliRunner

    from featx.cli import cli

    words = shlex.split(command, comments=True)
    assert words[0] == "featx", "only featx commands run here; mark the block <!-- not run -->"
    args = []
    for word in words[1:]:
        matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
        assert matches, f"{word} matches no file"
        args += matches
    return CliRunner().invoke(cli, args)


def test_every_page_has_a_runnable_or_marked_example():
    pages = {page.name: shell_examples(page) for page in tutorial_pages()}
    assert all(pages[name] for name in PAGES_WITH_EXAMPLES)


def test_the_tutorial_runs(tmp_path, monkeypatch):
    from featx._backend import backend_name

    if backend_name() != "tensorflow":
        pytest.skip("the tutorial runs on the TensorFlow backend (a new user's); its "
                    "commands' other-backend paths are tested on small models")
    monkeypatch.chdir(tmp_path)
    write_tutorial_data(tmp_path)
    ran = 0
    for page in tutorial_pages():
        for number, command in shell_examples(page):
            result = run_example(command)
            where = f"{page.relative_to(ROOT)}:{number}: $ {command}"
            assert result.exit_code == 0, f"{where}\nexit {result.exit_code}\n{result.output}"
            ran += 1
    assert ran >= 15
