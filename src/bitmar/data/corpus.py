"""Where the text-only BabyLM corpus lives and what its lines must be (no torch, no tokenizer: the verifier imports
this as it is, so the loaders and the verifier apply the very same rules).

Where the six `<source>.train` files are looked for, in order:
1. `<data_dir>/train_50M.zip`: any member whose file name is `<source>.train` (the release unpacks into
   `train_50M/<source>.train`; a flat zip works too; `__MACOSX/` and `._*` entries are ignored);
2. the unpacked folder `<data_dir>/train_50M/<source>.train`;
3. `<data_dir>/<source>.train`.

Lines must be UTF-8: a line that is not stops with a `DataError` naming the file and line number (silently
replacing bytes would train on mojibake). With `clean=True` (`data.clean_text`), CHAT speaker labels (`*CHI:\\t`),
Switchboard labels (`A:\\t`), dependent tiers (`%mor:\\t...`), CHAT headers (`@Begin`) and `= = = title = = =`
headers are removed and blank lines dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bitmar.data import layout
from bitmar.data.errors import DataError

_SPEAKER = re.compile(r"^(\*[A-Za-z0-9_]+:[ \t]+|[A-Z]:\t)")  # "*CHI:\t", "*MOT: ", "A:\t" (Switchboard: tab only)
_DEPENDENT_TIER = re.compile(r"^%[A-Za-z]+:")  # "%mor:", "%gra:"
_CHAT_HEADER = re.compile(r"^@[A-Za-z]")  # "@Begin", "@Participants:"
_TITLE = re.compile(r"^=( =)+ .*=( =)*$")  # "= = = childes_001.cha = = ="


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `path`: ranks/processes building the same cache take turns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def clean_line(line: str) -> str | None:
    """The utterance of one corpus line without speaker labels, or None for a line that holds no utterance."""
    text = line.strip()
    if not text or _DEPENDENT_TIER.match(text) or _CHAT_HEADER.match(text) or _TITLE.match(text):
        return None
    text = _SPEAKER.sub("", text).strip()
    return text or None


@dataclass(frozen=True)
class TextFile:
    """One `<source>.train` file, inside the zip (`member` set) or on disk."""

    source: str
    path: Path  # the zip or the .train file
    member: str | None = None

    @property
    def display(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def identity(self) -> dict[str, Any]:
        stat = self.path.stat()
        return {"source": self.source, "path": str(self.path.resolve()), "member": self.member,
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # fmt: skip


def _bad_zip(path: Path, data_dir: Path, err: Exception) -> DataError:
    return DataError(
        f"{path} is not a readable zip archive ({err}); it is probably truncated or corrupt. Delete it and "
        f"re-download: {layout.fetch_command(str(data_dir), layout.TEXT_ZIP)}"
    )


def _zip_members(names: Sequence[str], source: str) -> list[str]:
    """Members of the text zip that hold `source` (any folder; macOS resource forks ignored)."""
    return [
        n for n in names
        if PurePosixPath(n).name == f"{source}.train" and "__MACOSX" not in n
        and not PurePosixPath(n).name.startswith("._")
    ]  # fmt: skip


def _unpacked_candidates(data_dir: Path, source: str) -> list[Path]:
    return [data_dir / Path(layout.TEXT_ZIP).stem / f"{source}.train", data_dir / f"{source}.train"]


def text_corpus_present(data_dir: str | os.PathLike, sources: Sequence[str] = layout.TEXT_SOURCES) -> bool:
    """True when `locate_text_files` has something to look at: the zip, or every source unpacked."""
    data_dir = Path(data_dir)
    if (data_dir / layout.TEXT_ZIP).is_file():
        return True
    return all(any(c.is_file() for c in _unpacked_candidates(data_dir, s)) for s in sources)


def locate_text_files(data_dir: str | os.PathLike, sources: Sequence[str] = layout.TEXT_SOURCES) -> list[TextFile]:
    """Find the `.train` file of every source (see the module docstring for the search order).

    The loaders and the verifier both call this: a layout one accepts, the other accepts. Every missing source is
    named in one DataError."""
    data_dir = Path(data_dir)
    unknown = [s for s in sources if s not in layout.TEXT_SOURCES]
    if unknown:
        raise DataError(f"data.text_sources holds unknown sources {unknown}; valid: {list(layout.TEXT_SOURCES)}")
    if not sources:
        raise DataError(f"data.text_sources is empty; list at least one of {list(layout.TEXT_SOURCES)}")
    zip_path = data_dir / layout.TEXT_ZIP
    refetch = layout.fetch_command(str(data_dir), layout.TEXT_ZIP)
    if zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise _bad_zip(zip_path, data_dir, err) from err
        found, problems = [], []
        for source in sources:
            matches = _zip_members(names, source)
            if len(matches) == 1:
                found.append(TextFile(source, zip_path, matches[0]))
            else:
                problems.append(
                    f"no member named {source}.train" if not matches else f"{len(matches)} members {matches}"
                )
        if problems:
            shown = [n for n in names if n.endswith(".train")] or names
            raise DataError(
                f"{zip_path} has {'; '.join(problems)} (it holds: {', '.join(shown[:10]) or 'nothing'}"
                f"{', ...' if len(shown) > 10 else ''}); re-download it: {refetch}"
            )
        return found
    found, missing = [], []
    for source in sources:
        path = next((c for c in _unpacked_candidates(data_dir, source) if c.is_file()), None)
        if path is None:
            missing.append(source)
        else:
            found.append(TextFile(source, path))
    if missing:
        where = " or ".join(str(c) for c in _unpacked_candidates(data_dir, "<source>"))
        raise DataError(
            f"text source{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} not found: looked "
            f"for {zip_path}, then {where}. Fetch the corpus with: {refetch}"
        )
    return found


def decode_line(raw: bytes, file: TextFile, lineno: int) -> str:
    """One corpus line as text; a line that is not UTF-8 is a DataError naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{file.display}: line {lineno} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
            f"{err.start + 1}: {raw[:80]!r}). BabyLM text is UTF-8: re-download the file, or convert it "
            "(e.g. `iconv -f latin1 -t utf-8`)"
        ) from err


def iter_raw_lines(file: TextFile) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of one source; a corrupt zip member (CRC, truncation) is a DataError."""
    with contextlib.ExitStack() as stack:
        if file.member is not None:
            try:
                archive = stack.enter_context(zipfile.ZipFile(file.path))
                stream = stack.enter_context(archive.open(file.member))
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as err:
                raise _bad_zip(file.path, file.path.parent, err) from err
        else:
            stream = stack.enter_context(open(file.path, "rb"))
        lineno = 0
        while True:
            try:
                raw = stream.readline()
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:  # CRC mismatch or truncated member
                raise _bad_zip(file.path, file.path.parent, err) from err
            if not raw:
                break
            lineno += 1
            yield lineno, raw


def iter_file_lines(file: TextFile, clean: bool = True) -> Iterator[str]:
    """The lines of one source (cleaned when `clean`); non-UTF-8 bytes raise a DataError with the line number."""
    for lineno, raw in iter_raw_lines(file):
        line = decode_line(raw, file, lineno).rstrip("\r\n")
        if clean:
            kept = clean_line(line)
            if kept is not None:
                yield kept
        elif line.strip():
            yield line


def iter_text_lines(files: Sequence[TextFile], clean: bool = True) -> Iterator[str]:
    for file in files:
        yield from iter_file_lines(file, clean)
