"""The documentation tells the truth about today's command line, and no committed file names a path of the
machine it was made on.

Every command in a ```bash block of the README and the docs is checked: ``python cli.py fit|validate|test|predict``
composes with ``--print_config`` (and has data and a model: a paper overlay without ``experiments/base.yaml``
composes to ``data: null``), a tool command (``sample``, ``evaluate``, ...) parses with its own parser, a
``python -m`` module imports, and a script the command runs is in the repository."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

import cli
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "ablations" / "README.md"]
# Programs the docs may run that are not in this repository (installed with the environment, or the shell's).
EXTERNAL = {"pip", "pytest", "wandb", "jupyter", "hf", "sleep", "scontrol", "exit", "["}
SHELL_WORDS = {"until", "while", "do", "done", "if", "then", "fi", "&&", "||", ";", "|"}
SCRIPT = re.compile(r"\.(py|sh|ipynb|yaml)$")


def bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a Markdown file (indented ones in lists too), dedented."""
    pattern = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(path.read_text())]


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at ``&&``, ``;``
    and ``|``, shell keywords and leading ``VAR=value`` assignments removed."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for word in [*lexer, ";"]:
            if word in SHELL_WORDS:
                if current:
                    found.append(current)
                current = []
            elif current or not re.fullmatch(r"[A-Za-z_]+=\S*", word):
                current.append(word)
    return found


def test_the_block_reader_finds_indented_blocks_and_splits_commands():
    text = "a\n\n   ```bash\n   X=1 python cli.py fit -c a.yaml \\\n     --b 1   # note\n   ```\n"
    assert [commands(b) for b in re.findall(r"```bash\n(.*?)```", textwrap.dedent(text), re.DOTALL)] == [
        [["python", "cli.py", "fit", "-c", "a.yaml", "--b", "1"]]
    ]
    assert commands("until python cli.py fit --ckpt_path last; do sleep 1; done") == [
        ["python", "cli.py", "fit", "--ckpt_path", "last"],
        ["sleep", "1"],
    ]
    assert commands("a && . .venv/bin/activate && pip install -e '.[dev]'") == [
        ["a"],
        [".", ".venv/bin/activate"],
        ["pip", "install", "-e", ".[dev]"],
    ]


class Parsed(Exception):
    """Raised in place of running a tool once its options parsed."""


def check_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None if ``python cli.py ARGS`` parses (Lightning: composes with data and a model), else why not."""
    out = io.StringIO()
    if args[0] in cli.LIGHTNING_COMMANDS and "--help" not in args:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
            cli.main([*args, "--print_config"])
        if stop.value.code not in (0, None):
            return f"exit status {stop.value.code}"
        config = yaml.safe_load(out.getvalue())
        missing = [key for key in ("data", "model") if not config.get(key)]
        return f"composes without {missing} (a paper overlay needs -c experiments/base.yaml first)" if missing else None
    original = ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):  # type: ignore[no-untyped-def]
        original(self, *a, **k)
        raise Parsed

    monkeypatch.setattr(ArgumentParser, "parse_args", parse_then_stop)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli.main(args)
    except Parsed:
        return None
    except SystemExit as e:
        status = e.code
    finally:
        monkeypatch.setattr(ArgumentParser, "parse_args", original)
    return None if status in (0, None) else f"exit status {status}: {out.getvalue()[-300:]}"


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(path.relative_to(ROOT).as_posix(), c) for path in DOCS for b in bash_blocks(path) for c in commands(b)]


def test_every_documented_command_is_true_to_todays_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    found = documented_commands()
    assert len({doc for doc, _ in found}) >= 5 and len(found) >= 30, found
    problems, checked = [], {}
    for doc, words in found:
        program, args = words[0], words[1:]
        where = f"{doc}: {shlex.join(words)}"
        if program in {".", "source"} or program in EXTERNAL:
            continue
        if program == "srun":  # runs the command that follows on every task
            program, args = args[0], args[1:]
        if program == "torchrun":
            program, args = "python", args[args.index("cli.py") :] if "cli.py" in args else ["<no cli.py>"]
        if program == "bash":
            args = args or ["-"]
            if not (ROOT / args[0]).is_file():
                problems.append(f"{where}: no script {args[0]}")
            continue
        if not re.fullmatch(r"python(3(\.\d+)?)?", program):
            problems.append(f"{where}: unknown program {program!r} (add it to EXTERNAL if it is one)")
            continue
        if args[:2] == ["-m", "venv"]:
            continue
        if args[:1] == ["-m"]:
            if importlib.util.find_spec(args[1]) is None:
                problems.append(f"{where}: no module {args[1]}")
        elif args[:1] == ["cli.py"]:
            key = tuple(args[1:])
            if key not in checked:
                checked[key] = check_cli(list(key), monkeypatch) if key else "no command"
            if checked[key]:
                problems.append(f"{where}: {checked[key]}")
        elif not (ROOT / args[0]).is_file():
            problems.append(f"{where}: no script {args[0]}")
        for arg in args[1:]:  # inputs the command names: scripts, configs, notebooks (globs too)
            if SCRIPT.search(arg) and not arg.startswith(("runs/", "data/")) and not list(ROOT.glob(arg)):
                problems.append(f"{where}: no file {arg}")
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_overlay_without_its_base_and_a_wrong_option(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "without ['data']" in check_cli(["test", "-c", "experiments/dico-xl-256.yaml"], monkeypatch)
    assert check_cli(["sample", "--ckpt", "x.ckpt", "--num_sampels", "3"], monkeypatch)
    assert check_cli(["sample", "--ckpt", "x.ckpt", "--num_samples", "3"], monkeypatch) is None


# A path of the machine a file was made on: a path that starts at the root with work, home, root or tmp.
MACHINE_PATH = re.compile(r"(?<![\w.~/$-])/(?:work|home|root|tmp)/")


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / p for p in listed.decode().split("\0") if p]
    return [p for p in paths if p.is_file() and b"\0" not in p.read_bytes()[:8192]]


def files_with_machine_paths(paths: list[Path]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)}:{n}"
        for p in paths
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]


def test_the_machine_path_pattern():
    tmp, home = "/".join(["", "tmp", "abl"]), "/".join(["", "home", "me"])  # not spelled out: this file is checked too
    assert MACHINE_PATH.search(f"--out {tmp}") and MACHINE_PATH.search(f"`{home}/x`")
    assert not MACHINE_PATH.search("https://example.org/home/x") and not MACHINE_PATH.search("runs/tmp/x")


def test_no_committed_file_holds_a_path_of_the_machine_that_made_it():
    files = tracked_text_files()  # the committed ablation reports included
    assert len(files) > 100
    found = files_with_machine_paths(files)
    assert not found, f"absolute machine paths in: {found}"
