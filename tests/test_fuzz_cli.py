"""Fuzzed text inputs (issue 28): exclude lists with hostile content, and every option and
argument that takes a value, of every command, fed hostile values (NUL bytes, 10,000
characters, bytes that are not UTF-8, huge and negative numbers, paths outside DATA, the
empty string).

Each invocation ends with exit 0 or 2, never 1 and never a traceback, and a refusal is one
``Error:`` line (after click's usage lines for its own checks). The commands get a DATA,
MODEL or cache that does not exist, so they stop right after their options are checked;
the options featx checks itself are given what reaches their check.
"""

import os
import posixpath
from pathlib import Path

import click
import pytest
from conftest import invoke, make_dataset
from fuzz_settings import fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from featx.cli import cli
from featx.data import read_exclude_file
from featx.errors import DataError

TINY_ARGS = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32",
             "--no-progress"]
HOSTILE = ["a\0b", "x" * 10_000, "y" * 255, "\udcff\udcfe", "a\nb", "", "-1",
           "-99999999999999999999", "99999999999999999999", "1e309", "nan", "-inf",
           "../outside", ".", "OUTSIDE_FILE", "/proc/featx-cannot-be-made"]


def commands(group=cli, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def takes_value(param) -> bool:
    return isinstance(param, click.Argument) or not (param.is_flag or param.count)


ALL_CASES = [(path, param.name) for path, command in commands() for param in command.params
             if takes_value(param)]
# featx finetune imports Keras before it reads its options: its cases run where Keras may
CASES = [case for case in ALL_CASES if case[0] != ("finetune",)]
FINETUNE_CASES = [case for case in ALL_CASES if case[0] == ("finetune",)]


def case_id(case):
    return f"{' '.join(case[0])} {case[1]}"


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Where a command may look: a working folder two levels down (so that ../outside stays
    in tmp_path), and a file outside any DATA."""
    cwd = tmp_path / "deep" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text("not an image, a model or a cache\n")
    return tmp_path, outside


def argv(path, name, value, tmp):
    """The command line that gives parameter ``name`` of command ``path`` the ``value``:
    options first, so that they are checked first; every other argument is something that
    does not exist; ``--`` so that a value such as -1 is taken as the argument it is for."""
    command = dict(commands())[path]
    missing = {"data": tmp / "missing", "model": tmp / "missing.skops",
               "paths": tmp / "missing.jpg", "path": tmp / "missing.h5",
               "image": tmp / "missing.png", "pattern": "*"}
    required = {"out_png": tmp / "preview.png", "output": tmp / "out"}
    options, arguments = [], []
    for param in command.params:
        if isinstance(param, click.Argument):
            arguments.append(value if param.name == name else missing[param.name])
        elif param.name == name:
            options = [param.opts[-1], value] + options
        elif param.required:
            options += [param.opts[-1], required[param.name]]
    return [*path, *options, "--", *arguments]


def check_outcome(result, line):
    """Exit 0 or 2, no traceback; on 2, exactly one Error: line and nothing but click's
    usage lines and featx's log lines beside it."""
    assert result.exit_code in (0, 2), f"{line}: exit {result.exit_code}: {result.output}"
    lines = result.stderr.split("\n")  # a line ends at \n (splitlines also cuts at \f, ...)
    errors = [text for text in lines if text.startswith("Error: ")]
    assert len(errors) == (result.exit_code == 2), f"{line}: {result.stderr}"
    for text in lines:
        assert not text or text.startswith(("Error: ", "Usage: ", "Try '", "featx: ")), \
            f"{line}: a second line: {text!r}"
    return errors[0] if errors else ""


def run(path, name, value, places):
    tmp, outside = places
    value = str(outside) if value == "OUTSIDE_FILE" else value
    result = invoke(*argv(path, name, value, tmp))
    return check_outcome(result, f"{case_id((path, name))}={value[:20]!r}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_value_taking_parameter(places, case):
    for value in HOSTILE:
        run(*case, value, places)


@pytest.mark.keras
def test_every_value_taking_parameter_of_finetune(places):
    for case in FINETUNE_CASES:
        for value in HOSTILE:
            run(*case, value, places)
    for name, named in (("backbone", "backbone"), ("weights", "weights")):
        for value in REFUSED[name]:
            assert named in run(("finetune",), name, value, places), value


def hostile_text():
    return st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
        st.integers().map(str), st.floats().map(str),
        st.lists(st.sampled_from(["..", ".", "a", "\0", "\n", " ", "#", "~", "\\", "é"]),
                 max_size=12).map("/".join))


def stays_inside(value: str, tmp: Path) -> bool:
    """No generated value may name a place outside tmp_path (featx would create a cache
    there, or list a whole disk)."""
    if value.startswith(("/", "~")):
        return False
    where = posixpath.normpath(posixpath.join(os.getcwd(), value))
    return where.startswith(f"{tmp}/")


@fuzz_settings(150)
@given(case=st.sampled_from(CASES), value=hostile_text())
def test_random_values(places, case, value):
    assume(stays_inside(value, places[0]))
    run(*case, value, places)


# ----- the checks featx makes itself are reached -----------------------------------------
OWN_CHECKS = {  # option -> commands, and what the refusal names
    "backbone": (["extract", "fit", "compare", "audit", "demo"], "backbone"),
    "weights": (["extract", "fit", "compare", "audit"], "weights"),
    "clf": (["fit"], "--clf"), "clfs": (["compare"], "--clf"),
    "unfreeze": (["finetune"], "--unfreeze"), "name": (["fit", "finetune"], "--name"),
}
REFUSED = {"backbone": ["", "a\0b", "x" * 10_000, "../outside", "a+a", "+"],
           "weights": ["a\0b", "x" * 10_000, "../outside", "\udcff"],
           "clf": ["a\0b", "x" * 10_000, "", "svm,svm,nope", "all"],
           "clfs": ["a\0b", "x" * 10_000, "", "nope"],
           "unfreeze": ["a\0b", "x" * 10_000, "", "-1", "0", "1e309"],
           "name": ["", "a\0b", "x" * 10_000, "y" * 255, "../outside", "a/b", "..", "a\nb"]}


@pytest.mark.parametrize("name", sorted(OWN_CHECKS))
def test_options_featx_checks_itself_refuse_in_one_line(places, name):
    paths, named = OWN_CHECKS[name]
    for command in paths:
        for value in REFUSED[name]:
            line = run((command,), name, value, places)
            assert named in line, f"{command} {name}={value[:20]!r}: {line}"


def test_ray_address_is_checked_before_any_connection(places, monkeypatch):
    from featx.extraction import _extract

    monkeypatch.setattr(_extract, "require_ray", lambda: None)  # its own check is the point
    for value in ["a\0b:1", "x" * 10_000, "host", ":80", "host:0", "host:65536",
                  "host:99999999999999999999", "host:-1", "\udcff:80", "a\nb:80", "host:²"]:
        result = invoke("extract", places[0] / "missing", "--engine", "ray", "--ray-address",
                        value)
        line = check_outcome(result, repr(value[:20]))
        assert line.startswith("Error: --ray-address ") and "expected HOST:PORT" in line


def test_a_bad_image_limit_stops_extraction_in_one_line(places, monkeypatch):
    data = make_dataset(places[0] / "data", per_class=2)
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", "lots")
    line = check_outcome(invoke("extract", data, *TINY_ARGS), "FEATX_MAX_IMAGE_PIXELS")
    assert line == ("Error: FEATX_MAX_IMAGE_PIXELS='lots': expected a positive whole number "
                    "of pixels")


# ----- exclude lists ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("exclude") / "data", per_class=2).resolve()


def listed_images(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


@st.composite
def fair_line(draw, folder):
    """A line a person might write: (text, the path it lists or None)."""
    rel = draw(st.sampled_from(listed_images(folder)))
    cls, name = rel.split("/")
    spelled = draw(st.sampled_from([rel, f"./{rel}", f"{cls}/../{rel}", f"{cls}//{name}",
                                    str(folder / rel)]))
    return draw(st.sampled_from([
        (spelled, rel), (f"  {spelled}\t", rel), (f"{spelled}  # a reason", rel),
        ("# a comment", None), ("", None), ("   ", None), ("cat/gone.png", "cat/gone.png")]))


def hostile_line(folder):
    return st.one_of(
        st.sampled_from(["../data/../outside.png", "cat/../../x.png", "..", "/etc/passwd",
                         str(folder.parent / "other" / "x.png"), "z" * 5000,
                         "y" * 1_000_000]),
        st.builds(lambda a, b: f"{a}\0{b}", *[st.text(PLAIN, max_size=20)] * 2))


# text that encodes (no lone surrogates), with no comment and no line break
PLAIN = st.characters(blacklist_categories=("Cs",), blacklist_characters="#\n\r")


@st.composite
def exclude_file(draw, folder, hostile: bool):
    """(the file's bytes, the paths it lists, or None when it must be refused)."""
    lines = draw(st.lists(fair_line(folder), max_size=6))
    if hostile:
        lines.insert(draw(st.integers(0, len(lines))), (draw(hostile_line(folder)), None))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(line for line, _ in lines)
    data = text.encode()
    if hostile and draw(st.booleans()):
        data += b"\n\xff\xfe not UTF-8"
    expected = None if hostile else {rel for _, rel in lines if rel}
    return data, expected


def refused_in_one_line(path, folder):
    with pytest.raises(DataError) as info:
        read_exclude_file(path, folder)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@fuzz_settings(60)
@given(data=st.data())
def test_exclude_lists_list_files_under_data_or_are_refused(tmp_path, folder, data):
    content, expected = data.draw(exclude_file(folder, hostile=data.draw(st.booleans())))
    path = tmp_path / "exclude.txt"
    path.write_bytes(content)
    if expected is None:
        refused_in_one_line(path, folder)
    else:
        assert read_exclude_file(path, folder) == expected


@fuzz_settings(15)
@given(data=st.data())
def test_hostile_exclude_lists_stop_the_command_in_one_line(places, folder, data):
    content, _ = data.draw(exclude_file(folder, hostile=True))
    path = places[0] / "exclude.txt"
    path.write_bytes(content)
    command = data.draw(st.sampled_from(["extract", "fit", "audit"]))
    result = invoke(command, folder, *TINY_ARGS, "--exclude", path, "--cache-dir",
                    places[0] / "cache")
    assert check_outcome(result, command).startswith(f"Error: {path}: ")


def test_exclude_list_refusals_name_the_line(tmp_path, folder):
    path = tmp_path / "x.txt"
    for line, says in [("cat/../../x.png", "is not a file under"), ("/etc/passwd", "is not"),
                       ("a\0b", "a NUL byte"), ("y" * 1_000_000, "1,000,000 characters")]:
        path.write_text(f"# listed by hand\r\ncat/cat_000.png\r\n{line}\r\n")
        message = refused_in_one_line(path, folder)
        assert message.startswith(f"{path}: line 3: ") and says in message
    path.write_bytes(b"cat/cat_000.png\n\xff\n")
    assert "cannot read exclude file" in refused_in_one_line(path, folder)
