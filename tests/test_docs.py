"""The documentation stays true: internal links resolve, and every command a page shows parses with its CLI.

Commands are checked without running them: the CLI's module is imported, `argparse.ArgumentParser.parse_args` is
wrapped so that it parses as usual and then stops the program with the namespace, and the CLI's `main` is called
with the documented arguments. An argparse rejection (a stale or misspelt flag, a wrong choice) is a SystemExit with
argparse's message, reported with the page and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# Pages the README must link (one per subsystem, issue 18).
SUBSYSTEM_PAGES = (
    "configuration", "data", "model-and-memory", "training-and-logging", "attention-analysis",
    "evaluation-and-ablations", "export-and-babylm", "performance", "failure-behaviour", "testing", "design",
)  # fmt: skip
ROOT_SCRIPTS = (
    "train_bitmar.py", "evaluate_bitmar.py", "analyze_attention_heads.py", "download_babylm_data.py",
    "test_dataset_compatibility.py", "test_cpu_compatibility.py",
)  # fmt: skip
# CLIs that take plain positional arguments without argparse: (min, max) number of arguments.
NON_ARGPARSE = {"bitmar.evaluation.figures": (1, 2)}
# Paths the pages name on purpose although they no longer exist (history: "the copies under X are gone").
GONE = {"configs/ablations/"}
# Placeholders the pages use for values; replaced by something each option's type accepts.
PLACEHOLDERS = {
    "N": "1", "CONFIG": "configs/bitmar_tiny.yaml", "PATH": "outputs/checkpoints/last.pt", "FILE": "bench.json",
    "NAME": "bitlinear", "key=value": "training.batch_size=4", "KEY=VALUE": "training.batch_size=4",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- markdown


def _strip_code(text: str) -> str:
    """The text without fenced or indented code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"(?:^(?: {4}|\t).*\n?)+", "", text, flags=re.M)
    return re.sub(r"`[^`]*`", "", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, spaces and -) kept."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def links(page: Path) -> Iterator[str]:
    yield from re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _strip_code(page.read_text(encoding="utf-8")))


def test_every_internal_link_resolves() -> None:
    checked, broken = 0, []
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check offline
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(REPO)} -> {target}"
            checked += 1
            if not dest.exists():
                broken.append(f"{where}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} missing")
            elif not dest.is_relative_to(REPO):
                broken.append(f"{where}: points outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked >= 60, f"only {checked} internal links found: is the link pattern still right?"


def _inline_code(page: Path) -> Iterator[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"(?:^(?: {4}|\t).*\n?)+", "", text, flags=re.M)
    yield from (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))


def test_named_files_and_python_names_exist() -> None:
    """Repository paths (`src/...`, `tests/...`, `configs/...`, `scripts/...`) and dotted `bitmar.` names the pages
    quote still exist after a file is moved or split (a test node `file.py::test` counts by its file)."""
    missing, paths, names = [], 0, 0
    for page in PAGES:
        for span in _inline_code(page):
            path = re.fullmatch(r"((?:src|tests|configs|scripts|docs)/[\w./-]*\w)(?:::(\w+))?/?", span)
            if path and not re.search(r"[<>*]", span) and span not in GONE:
                paths += 1
                file = REPO / path[1]
                if not file.exists():
                    missing.append(f"{page.relative_to(REPO)}: `{span}` does not exist")
                elif path[2] and not re.search(rf"^\s*(?:async )?def {path[2]}\(", file.read_text(), flags=re.M):
                    missing.append(f"{page.relative_to(REPO)}: `{span}`: no such test in {path[1]}")
            name = re.fullmatch(r"(bitmar(?:\.\w+)+)(?:\(.*\))?", span)
            if name:
                names += 1
                if not _resolves(name[1]):
                    missing.append(f"{page.relative_to(REPO)}: `{span}` is not importable")
    assert not missing, "\n".join(missing)
    assert paths >= 10 and names >= 15, (paths, names)


def _resolves(dotted: str) -> bool:
    """Whether `a.b.c` is a module, or an attribute path below the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_readme_is_a_front_door_linking_every_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 12_000, f"README.md is {len(text.encode())} bytes: move reference material into docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p for p in SUBSYSTEM_PAGES if (DOCS / f"{p}.md").resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {missing}"
    # .ci/run runs the README's test command; both must say the same
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_command = [ln for ln in ci.splitlines() if ln.startswith("python -m pytest")]
    assert ci_command and f"pip install -r requirements.txt && {ci_command[0]}" in text


def test_readme_headline_numbers_are_the_docs_numbers() -> None:
    """A measured value the README quotes (mean ± CI, times, ratios) is the one its docs page holds."""
    docs = " ".join(" ".join(p.read_text(encoding="utf-8").split()) for p in PAGES[1:])
    readme = " ".join(README.read_text(encoding="utf-8").split())
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+|\d+ min \d+ s|\d+\.\d+ min|\d+\.\d+×", readme)
    assert len(quoted) >= 10
    stale = sorted({q for q in quoted if q not in docs})
    assert not stale, f"README numbers that no docs page holds (update the README from the page): {stale}"


def test_design_has_the_numbered_sections_code_cites() -> None:
    headings = re.findall(r"^## (\d+)\. (.+)$", (DOCS / "design.md").read_text(encoding="utf-8"), flags=re.M)
    assert headings == [("1", "Data flow"), ("2", "Reference formulas"), ("3", "Traps avoided"), ("4", "Conventions")]


def test_code_cites_design_sections_that_exist() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", (DOCS / "design.md").read_text(encoding="utf-8"), flags=re.M))
    sources = [*REPO.glob("*.py"), *(REPO / "src").rglob("*.py"), *(REPO / "scripts").rglob("*.py"),
               *(p for p in (REPO / "tests").rglob("*.py") if p.name != Path(__file__).name)]  # fmt: skip
    cited, wrong = 0, []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        for n in re.findall(r"docs/design\.md §(\d+)", text):
            cited += 1
            if n not in sections:
                wrong.append(f"{source.relative_to(REPO)}: docs/design.md §{n} does not exist")
        if re.search(r"(?<![/\w])DESIGN\.md", text):
            wrong.append(f"{source.relative_to(REPO)}: cites DESIGN.md, which is docs/design.md now")
    assert not wrong, "\n".join(wrong)
    assert cited >= 3


def test_benchmark_pages_are_dated_with_machine_and_command() -> None:
    pages = sorted((DOCS / "benchmarks").glob("*.md"))
    assert len(pages) >= 4
    performance = (DOCS / "performance.md").read_text(encoding="utf-8")
    for page in pages:
        date = re.match(r"^(\d{4}-\d{2}-\d{2})-[a-z0-9-]+\.md$", page.name)
        assert date, f"{page.name}: name it <YYYY-MM-DD>-<what>.md"
        text = page.read_text(encoding="utf-8")
        assert text.startswith(f"# {date[1]} "), f"{page.name}: the title starts with the date"
        assert "Machine:" in text and "ommand" in text, f"{page.name}: say the machine and the command"
    latest: dict[str, Path] = {}
    for page in pages:  # the newest page of each measurement is the one performance.md must link
        latest[page.name[11:]] = page
    for page in latest.values():
        assert f"benchmarks/{page.name}" in performance, f"performance.md does not link the latest {page.name}"


# ---------------------------------------------------------------------------------------------------- commands


def _code_texts(text: str) -> Iterator[tuple[str, bool]]:
    """Code the page shows, with whether it is an inline span: fenced and indented blocks (line by line), spans."""
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        yield from ((line, False) for line in _logical_lines(block))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    indented = re.findall(r"(?:^(?: {4}|\t).*\n?)+", prose, flags=re.M)
    for block in indented:
        yield from ((line, False) for line in _logical_lines(block))
    prose = re.sub(r"(?:^(?: {4}|\t).*\n?)+", "", prose, flags=re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        yield " ".join(span.split()), True


def _logical_lines(block: str) -> Iterator[str]:
    """Lines of a code block, continuations joined: a trailing backslash, or a synopsis line that goes on with an
    indented `[--option ...]` / `--option` line."""
    lines: list[str] = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        if lines and line[:1].isspace() and line.strip().startswith(("[", "--")) and lines[-1].count("[") > 0:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    yield from lines


def _expand_synopsis(command: str) -> str:
    """A usage synopsis as one concrete command: first alternative, optional parts kept, placeholders filled."""
    command = re.sub(r"\s#.*$", "", command)  # shell comment
    command = command.replace("...", " ").replace("…", " ")
    while True:  # [--a | --b] -> --a
        new = re.sub(r"\[([^\[\]|]*?) \| [^\[\]]*\]", r"\1", command)
        if new == command:
            break
        command = new
    command = re.sub(r"(^|\s)\[", r"\1", command)
    command = re.sub(r"\](?=\s|$)", "", command)
    tokens = []
    for token in shlex.split(command):
        if "|" in token and not token.startswith(("'", '"')):
            token = token.split("|")[0]
        token = PLACEHOLDERS.get(token, token)
        if re.fullmatch(r"<[^>]+>", token):
            token = "placeholder"
        tokens.append(token)
    return shlex.join(tokens)


def _cli_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(CLI, its arguments) when the tokens run one of our CLIs; None for anything else."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[i]):
        i += 1  # VAR=value prefixes
    if tokens[i : i + 1] == ["/usr/bin/time"]:
        i += 1
        while i < len(tokens) and tokens[i].startswith("-"):
            i += 1
    if tokens[i : i + 1] == ["torchrun"]:
        i += 1
        while i < len(tokens) and tokens[i].startswith("-"):
            i += 1
        tokens = [*tokens[:i], "python", *tokens[i:]]  # torchrun SCRIPT args == python SCRIPT args here
    if i < len(tokens) and re.fullmatch(r"(?:\S*/)?python(?:3(?:\.\d+)?)?", tokens[i]):
        i += 1
    if i >= len(tokens):
        return None
    if tokens[i] == "-m" and i + 1 < len(tokens) and tokens[i + 1].split(".")[0] == "bitmar":
        return tokens[i + 1], tokens[i + 2 :]
    name = tokens[i]
    if name in ROOT_SCRIPTS or re.fullmatch(r"scripts/[A-Za-z0-9_]+\.py", name):
        return name, tokens[i + 1 :]
    return None


def documented_commands() -> list[tuple[str, str, str, list[str], bool]]:
    """(page, command as shown, CLI, arguments, inline) for each command with arguments that runs one of our CLIs."""
    found = []
    for page in PAGES:
        for code, inline in _code_texts(page.read_text(encoding="utf-8")):
            for part in re.split(r"\s(?:&&|;)\s", code):
                try:
                    tokens = shlex.split(_expand_synopsis(part))
                except ValueError:  # unbalanced quotes: prose inside backticks, not a command
                    continue
                cli = _cli_of(tokens) if tokens else None
                if cli and cli[1]:  # a bare program name is a mention, not a command with flags to check
                    found.append((str(page.relative_to(REPO)), part, *cli, inline))
    return found


_MODULES: dict[str, ModuleType] = {}


def _load(cli: str) -> ModuleType:
    if cli not in _MODULES:
        if cli.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"_docs_cli_{Path(cli).stem}", REPO / cli)
            assert spec and spec.loader, cli
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses in the script look their module up there
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(cli)
            if not hasattr(module, "main") and importlib.util.find_spec(f"{cli}.__main__"):
                module = importlib.import_module(f"{cli}.__main__")  # python -m PACKAGE
        _MODULES[cli] = module
    return _MODULES[cli]


class _Parsed(Exception):
    """Raised by the wrapped parse_args once the documented arguments have parsed."""


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """Within: parse_args parses, then raises _Parsed. A CLI that calls parse_known_args itself is stopped there too
    (argparse's own parse_args calls parse_known_args, which then must return normally), so no documented command
    can ever start real work here."""
    parse_args: Callable = argparse.ArgumentParser.parse_args
    parse_known_args: Callable = argparse.ArgumentParser.parse_known_args
    inside_parse_args = []

    def parse_and_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's own signature
        inside_parse_args.append(True)
        try:
            parsed = parse_args(self, args, namespace)
        finally:
            inside_parse_args.pop()
        raise _Parsed(parsed)

    def parse_known_and_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        parsed = parse_known_args(self, args, namespace)
        if inside_parse_args:
            return parsed
        raise _Parsed(parsed)

    argparse.ArgumentParser.parse_args = parse_and_stop  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = parse_known_and_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
        argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _parse_with_cli(cli: str, argv: list[str], fragment: bool = False) -> str | None:
    """None when the CLI's parser accepts argv; otherwise what went wrong.

    A fragment (a command quoted inside a sentence, e.g. `evaluate_bitmar.py --set key=value`) may leave out the
    required options; they are filled with a placeholder so that the flags it does show are still checked.
    """
    if cli in NON_ARGPARSE:
        low, high = NON_ARGPARSE[cli]
        return None if low <= len(argv) <= high else f"takes {low}..{high} arguments, got {len(argv)}"
    main = _load(cli).main
    takes_argv = bool(inspect.signature(main).parameters)
    err = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [cli, *argv]  # for a main() that reads sys.argv itself
    try:
        with _stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(list(argv)) if takes_argv else main()
    except _Parsed:
        return None
    except SystemExit as exit_:
        required = re.search(r"the following arguments are required: (.+)", err.getvalue())
        if fragment and required:
            missing = [opt for opt in required[1].split(", ") if opt.startswith("-")]
            if missing:
                return _parse_with_cli(cli, [*argv, *(x for opt in missing for x in (opt, "placeholder"))])
        return f"argparse rejected it (exit {exit_.code}): {err.getvalue().strip()}"
    finally:
        sys.argv = saved_argv
    return "main() returned without parsing its arguments with argparse"


COMMANDS = documented_commands()


def test_the_pages_show_commands_of_every_cli() -> None:
    """The extraction finds the commands (so the parsing test below cannot pass by finding none)."""
    assert len(COMMANDS) >= 40, [c[1] for c in COMMANDS]
    clis = {c[2] for c in COMMANDS}
    expected = {*ROOT_SCRIPTS, "bitmar.export", "bitmar.bench", "bitmar.evaluation.ablations",
                "scripts/run_babylm_pipeline.py"}  # fmt: skip
    assert expected <= clis, f"no documented command found for {sorted(expected - clis)}"


def test_every_documented_command_parses_with_its_cli() -> None:
    failures = []
    for page, shown, cli, argv, inline in COMMANDS:
        problem = _parse_with_cli(cli, argv, fragment=inline)
        if problem:
            failures.append(f"{page}: `{shown}`\n    {problem}")
    assert not failures, f"{len(failures)} documented command(s) do not parse:\n" + "\n".join(failures)


@pytest.mark.parametrize(
    ("shown", "expected"),
    [
        ("python train_bitmar.py --config CONFIG [--max_epochs N] [--phase 1|2|3]",
         ("train_bitmar.py", ["--config", "configs/bitmar_tiny.yaml", "--max_epochs", "1", "--phase", "1"])),
        ("OMP_NUM_THREADS=1 python -m bitmar.bench.loader --quick   # comment",
         ("bitmar.bench.loader", ["--quick"])),
        ("torchrun --nproc_per_node=4 train_bitmar.py --config c.yaml", ("train_bitmar.py", ["--config", "c.yaml"])),
        ("python x.py [--no_a | --require_a] --b <path>", None),
        ("python test_dataset_compatibility.py [--no_a | --require_a] --b <path>",
         ("test_dataset_compatibility.py", ["--no_a", "--b", "placeholder"])),
        ("python -m pytest -q", None),
    ],
)  # fmt: skip
def test_command_extraction(shown: str, expected: tuple[str, list[str]] | None) -> None:
    assert _cli_of(shlex.split(_expand_synopsis(shown))) == expected


def test_a_stale_flag_is_caught() -> None:
    problem = _parse_with_cli("evaluate_bitmar.py", ["--checkpoint", "x", "--no_such_flag"])
    assert problem and "--no_such_flag" in problem
