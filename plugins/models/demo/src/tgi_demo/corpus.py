"""The demo model's corpus: the Python standard library's own sources, read offline.

Every machine that runs Python has these files, so training downloads nothing. The
files are split into a training and a held-out set by a hash of their path inside the
standard library (the same split on every machine), and :func:`chat_examples` turns the
documented functions of the training files into ChatML conversations, so that the model
learns the chat format and to end an answer with ``<|im_end|>``.

Imports only the standard library.
"""

from __future__ import annotations

import ast
import inspect
import random
import sysconfig
import textwrap
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Folders left out: tests, data tables (codecs, pydoc topics) and third-party code.
SKIPPED_FOLDERS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "encodings",
        "pydoc_data",
        "__pycache__",
        "__phello__",
    }
)
#: One file in this many is held out (by the CRC-32 of its path) for validation.
HELDOUT_EVERY = 20
SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One module of the standard library: its path inside it, and its text."""

    path: str  # POSIX path relative to the standard library folder: ``email/utils.py``
    text: str


def stdlib_folder() -> Path:
    """The folder of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(path: str) -> bool:
    """Whether ``path`` (relative, POSIX) belongs to the held-out set."""
    return zlib.crc32(path.encode()) % HELDOUT_EVERY == 0


def stdlib_sources(root: Path | None = None) -> list[SourceFile]:
    """Every ``.py`` file of the standard library that the corpus uses, sorted by path."""
    root = stdlib_folder() if root is None else root
    files = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root)
        if SKIPPED_FOLDERS & set(relative.parts[:-1]):
            continue
        if relative.parts[0].startswith("config-") or file.name.startswith("_sysconfigdata"):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        files.append(SourceFile(relative.as_posix(), text))
    return files


def split(files: Sequence[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """``(training, held_out)``: about one file in ``HELDOUT_EVERY`` is held out."""
    training = [f for f in files if not is_heldout(f.path)]
    held_out = [f for f in files if is_heldout(f.path)]
    return training, held_out


def chatml(messages: Sequence[tuple[str, str]]) -> str:
    """Render ``(role, content)`` pairs as the demo's chat template does."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def _documented_functions(
    source: SourceFile,
) -> Iterator[tuple[str, str, str]]:
    """``(qualified name, docstring, dedented source)`` of each documented function."""
    try:
        tree = ast.parse(source.text)
    except (SyntaxError, ValueError):
        return
    lines = source.text.splitlines(keepends=True)
    module = source.path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    scopes: list[tuple[str, ast.AST]] = [(module, tree)]
    while scopes:
        prefix, node = scopes.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                scopes.append((f"{prefix}.{child.name}", child))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(child)
                if docstring and child.end_lineno is not None:
                    code = textwrap.dedent("".join(lines[child.lineno - 1 : child.end_lineno]))
                    yield f"{prefix}.{child.name}", inspect.cleandoc(docstring), code.rstrip()


def chat_examples(
    files: Sequence[SourceFile], *, seed: int = 0, max_chars: int = 1200
) -> list[str]:
    """ChatML conversations made from the documented functions of ``files``.

    Two kinds, alternating: the docstring's summary line asks for code and the answer
    is the function's source; or the user asks what ``module.function`` does and the
    answer is its docstring. Half of them start with a system prompt. Answers longer
    than ``max_chars`` are left out, so a conversation fits a training window.
    """
    rng = random.Random(seed)
    examples = []
    for source in files:
        for name, docstring, code in _documented_functions(source):
            summary = docstring.split("\n\n", 1)[0].replace("\n", " ").strip()
            if rng.random() < 0.5:
                question, answer = summary, code
            else:
                question, answer = f"What does `{name}` do?", docstring
            if not 10 <= len(summary) <= 200 or len(answer) > max_chars:
                continue
            system = [("system", SYSTEM_PROMPT)] if rng.random() < 0.5 else []
            examples.append(chatml([*system, ("user", question), ("assistant", answer)]))
    return examples
