"""Documentation that runs: every code block of README.md and docs/ is executed, and the site builds strictly.

How blocks are run (what a writer of README.md or docs/ needs to know):

- Fences labelled ``python`` / ``py`` run as Python; ``bash`` / ``sh`` / ``shell`` run under ``bash -euo pipefail``.
  Every other fence (``text``, ``yaml``, ``json``, ``toml``, no label, ...) is output or a file's contents and is
  not executed.
- One file, one process, in order: the blocks of one Markdown file run top to bottom in one fresh Python process
  (``python -c``, so the working directory is first on ``sys.path``, as for a user's script). Python blocks share
  that process's ``__main__`` namespace like a notebook's cells, and shell blocks run in the same working directory,
  so a later block may use the names and the files an earlier block made. The first failing block fails the file's
  test, which names it (``file:line``) and shows its output.
- Twice: every file runs from the repository root and from an empty temporary directory (no source tree on
  ``sys.path``, nothing beside it), the two runs side by side in one test. "The repository root" is mirrored: a
  temporary folder holding a symbolic link to each tracked top-level entry of the checkout, so blocks see exactly
  the root's importable names (``kernels/``, ``optimas_fast/``, ``examples/``) and relative paths while what they
  write stays out of the checkout.
- Markers, an HTML comment in the lines right above the fence:
  ``<!-- skip: reason -->`` the block is not run (a GPU, an API key, a multi-GB download, minutes of timing);
  ``<!-- repo-root: reason -->`` it runs from the repository root only (it reads files of the clone);
  ``<!-- write: PATH -->`` its text is written to PATH (relative to the working directory) instead of being run:
  how a page shows a config file that a later block uses.
  The three blocks that ``.ci/run`` runs itself (``<!-- demo-command -->``, ``<!-- test-command -->``,
  ``<!-- vllm-test-command -->``) are not run here. The blocks not run, with their reasons, are printed at the end
  of the pytest run (``pytest_terminal_summary`` in conftest.py).
- Where a real model would take too long, a block says so and uses the tiny backbones and scripted LMs the tests use.

Also here: ``mkdocs build --strict`` into a temporary folder, and the configuration reference's completeness (every
field of every settings dataclass has its comment; see docs/hooks/config_reference.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_LANGS = ("python", "py")
SHELL_LANGS = ("bash", "sh", "shell")
CI_BLOCKS = {  # README marker -> why the block is not run here
    "demo-command": ".ci/run runs the demo command itself, from a clean clone",
    "test-command": ".ci/run runs the test command itself (it is this suite)",
    "vllm-test-command": ".ci/run runs the vLLM command itself, in its own venv",
}
FILE_TIMEOUT_S = 600  # one Markdown file's blocks, in one process
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|repo-root|write)\s*:\s*(?P<arg>.*?)\s*-->\s*$")
_CI_MARKER = re.compile(r"^\s*<!--\s*(?P<name>[\w-]+)\s*-->\s*$")


@dataclass
class Block:
    path: Path  # the Markdown file
    line: int  # 1-based line of the opening fence
    lang: str  # the fence's label, lower case ("" when none)
    text: str  # the block's contents, de-indented
    skip: str | None = None  # why it is not run
    repo_root_only: str | None = None  # why it runs from the repository root only
    write: str | None = None  # the file its text is written to

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    @property
    def kind(self) -> str | None:
        """ "python", "shell", "write" or None (not executed)."""
        if self.write is not None:
            return "write"
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SHELL_LANGS:
            return "shell"
        return None


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the markers in the comment lines right above each fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        body, j = [], i + 1
        close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: a code fence that is never closed")
        block = Block(path, i + 1, lang, "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):  # the comment lines right above the fence
            mk, ci = _MARKER.match(lines[k]), _CI_MARKER.match(lines[k])
            if mk and mk["kind"] == "skip":
                block.skip = mk["arg"]
            elif mk and mk["kind"] == "repo-root":
                block.repo_root_only = mk["arg"]
            elif mk:
                block.write = mk["arg"]
            elif ci and ci["name"] in CI_BLOCKS:
                block.skip = CI_BLOCKS[ci["name"]]
            k -= 1
        for what in ("skip", "repo_root_only", "write"):
            if getattr(block, what) == "":
                raise ValueError(
                    f"{block.where}: a '{what.replace('_only', '').replace('_', '-')}:' marker needs "
                    f"a reason (or a path)"
                )
        blocks.append(block)
        i = j + 1
    return blocks


ALL_BLOCKS = {p: parse_blocks(p) for p in DOC_FILES}
RUN_FILES = [p for p, bs in ALL_BLOCKS.items() if any(b.kind and not b.skip for b in bs)]


def not_executed() -> list[str]:
    """One line per block that is not run, or run from the repository root only, with the reason."""
    out = []
    for blocks in ALL_BLOCKS.values():
        for b in blocks:
            if b.kind in ("python", "shell") and b.skip:
                out.append(f"{b.where} ({b.lang}) not run: {b.skip}")
            elif b.kind and not b.skip and b.repo_root_only:
                out.append(f"{b.where} ({b.lang}) from the repository root only: {b.repo_root_only}")
    return out


@pytest.fixture(scope="module", autouse=True)
def _report_not_executed(request):
    """Hands the list to conftest.py's pytest_terminal_summary, which prints it at the end of the run."""
    request.config.docs_not_executed = not_executed()
    yield


# ----------------------------------------------------------------------------------------------- running
# Runs in the child as `python -c`: the working directory is sys.path[0], as for a user's script. Blocks run in this
# module's own namespace (__main__), so classes they define pickle and `if __name__ == "__main__":` holds.
_RUNNER = r"""
import json as _docs_json, os as _docs_os, subprocess as _docs_sp, sys as _docs_sys, time as _docs_time
import traceback as _docs_tb
_docs_t0 = _docs_time.perf_counter()
for _docs_i, _docs_b in enumerate(_docs_json.load(open(_docs_sys.argv[1]))):
    print(f"\n@@docs-block {_docs_i} {_docs_b['where']} at {_docs_time.perf_counter() - _docs_t0:.1f} s", flush=True)
    if _docs_b["kind"] == "write":
        _docs_p = _docs_b["write"]
        _docs_os.makedirs(_docs_os.path.dirname(_docs_p) or ".", exist_ok=True)
        open(_docs_p, "w").write(_docs_b["text"])
        continue
    if _docs_b["kind"] == "shell":
        _docs_rc = _docs_sp.run(["bash", "-euo", "pipefail", "-c", _docs_b["text"]]).returncode
        if _docs_rc:
            print(f"@@docs-failed {_docs_i} shell exit status {_docs_rc}", flush=True)
            _docs_sys.exit(3)
        continue
    try:
        exec(compile(_docs_b["text"], _docs_b["where"], "exec"), globals())
    except BaseException:
        _docs_tb.print_exc(file=_docs_sys.stdout)
        print(f"@@docs-failed {_docs_i} python", flush=True)
        _docs_sys.exit(3)
    finally:
        _docs_sys.stdout.flush()
        _docs_sys.stderr.flush()
print(f"@@docs-done at {_docs_time.perf_counter() - _docs_t0:.1f} s", flush=True)
"""


def _mirror_root(dest: Path) -> Path:
    """A folder whose top-level entries are links to the checkout's tracked ones: the repository root as blocks see
    it (same importable names, same relative paths), with their outputs kept out of the checkout. Untracked entries
    (a developer's runs/ or rm/) are left out, so a block writing there cannot write into the checkout."""
    dest.mkdir()
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = {p.split("/", 1)[0] for p in tracked.decode().split("\0") if p}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): every entry
        names = {e.name for e in ROOT.iterdir()}
    for name in sorted(names - {".git"}):
        if (ROOT / name).exists():
            (dest / name).symlink_to(ROOT / name)
    return dest


def _child_env() -> dict:
    env = dict(os.environ)
    # `python`, `pip` and `optimas-fast` in shell blocks are this environment's, as after `. .venv/bin/activate`
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # nothing but the working directory and the installed package
    env["HF_HUB_OFFLINE"] = "1"  # CI never reaches a model hub: every model comes from a PyPI package
    env["PYTHONUNBUFFERED"] = "1"
    # the root and empty-directory runs go side by side on CI's two cores: one thread each, else torch's OpenMP
    # threads (two per process) oversubscribe the cores and spin (README.md: 120 s side by side with two threads
    # each at load 8, against 9 + 17 s for its two slowest blocks alone)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


class _FileRun:
    """One Markdown file's blocks running in one child process (``python -c _RUNNER``), its output in a log file."""

    def __init__(self, path: Path, cwd: Path, from_root: bool, tmp_path: Path):
        self.path, self.from_root = path, from_root
        blocks = [b for b in ALL_BLOCKS[path] if b.kind and not b.skip and (from_root or not b.repo_root_only)]
        tmp_path.mkdir(parents=True, exist_ok=True)
        spec = tmp_path / "blocks.json"
        spec.write_text(
            json.dumps([{"where": b.where, "kind": b.kind, "text": b.text, "write": b.write} for b in blocks])
        )
        self.log = tmp_path / "output.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUNNER, str(spec)],
                cwd=cwd,
                env=_child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def failure(self, deadline: float) -> str | None:
        """Waits for the child (killed at ``deadline``, a time.monotonic() value); None, or what failed."""
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        text = self.log.read_text(errors="replace")
        if rc == 0 and "@@docs-done" in text:
            return None
        started = re.findall(r"^@@docs-block (\d+) (\S+) at ", text, re.M)
        where = started[-1][1] if started else self.path.name
        tail = text[text.rfind("@@docs-block") :] if started else text
        status = f"timed out after {FILE_TIMEOUT_S} s" if rc is None else f"exit status {rc}"
        return (
            f"{where}: the documentation block failed ({status}; working directory "
            f"{'the repository root (mirrored)' if self.from_root else 'an empty temporary directory'}). "
            f"Its output:\n{tail[-6000:]}"
        )


def run_file(path: Path, cwd: Path, from_root: bool, tmp_path: Path) -> None:
    msg = _FileRun(path, cwd, from_root, tmp_path).failure(time.monotonic() + FILE_TIMEOUT_S)
    if msg:
        pytest.fail(msg, pytrace=False)


@pytest.mark.slow  # real models (MiniLM), the CLI and torchrun in subprocesses: ~5 minutes of CPU in all
@pytest.mark.parametrize("path", RUN_FILES, ids=[str(p.relative_to(ROOT)) for p in RUN_FILES])
def test_code_blocks_run(path, tmp_path):
    """The file's blocks from the repository root and from an empty directory, the two runs side by side (most of
    a run is one core importing torch and transformers: on CI's two cores the pair takes little more than one)."""
    root = _mirror_root(tmp_path / "root")
    empty = tmp_path / "empty"
    empty.mkdir()
    runs = [_FileRun(path, root, True, tmp_path / "root-run"), _FileRun(path, empty, False, tmp_path / "empty-run")]
    deadline = time.monotonic() + FILE_TIMEOUT_S
    failures = [m for m in (r.failure(deadline) for r in runs) if m]
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


# ----------------------------------------------------------------------------------------------- the collector
def test_collector_reads_fences_and_markers(tmp_path):
    md = tmp_path / "page.md"
    md.write_text(
        "text\n\n<!-- skip: needs a GPU -->\n```python\nimport x\n```\n\n"
        "<!-- demo-command -->\n```bash\nmake demo\n```\n<!-- /demo-command -->\n\n"
        "- a list item:\n\n    ```bash\n    echo hi\n    ```\n\n"
        "<!-- write: cfg.yaml -->\n```yaml\na: 1\n```\n\n```text\nout\n```\n\n"
        "<!-- repo-root: reads examples/ -->\n````sh\nls examples\n````\n"
    )
    blocks = parse_blocks(md)
    assert [(b.line, b.kind) for b in blocks] == [
        (4, "python"),
        (9, "shell"),
        (16, "shell"),
        (21, "write"),
        (25, None),
        (30, "shell"),
    ]
    assert blocks[0].skip == "needs a GPU" and blocks[1].skip == CI_BLOCKS["demo-command"]
    assert blocks[2].text == "echo hi\n" and blocks[2].skip is None
    assert blocks[3].write == "cfg.yaml" and blocks[3].text == "a: 1\n"
    assert blocks[5].repo_root_only == "reads examples/" and blocks[5].text == "ls examples\n"


def test_collector_rejects_a_marker_without_reason_and_an_open_fence(tmp_path):
    md = tmp_path / "page.md"
    md.write_text("<!-- skip: -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match=r"page.md:2: a 'skip:' marker needs a reason"):
        parse_blocks(md)
    md.write_text("```python\npass\n")
    with pytest.raises(ValueError, match=r"page.md:1: a code fence that is never closed"):
        parse_blocks(md)


def test_a_failing_block_fails_its_file_and_is_named(tmp_path):
    """The runner is what makes a stale snippet a failing test: a block that raises, or a shell block that exits
    non-zero, fails the file's test naming that block; names and files made by earlier blocks are visible."""
    md = tmp_path / "page.md"
    md.write_text(
        "```python\nvalue = 41\nopen('made.txt', 'w').write('x')\n```\n\n```bash\ntest -f made.txt\n```\n\n"
        "```python\nassert value == 41\nraise RuntimeError('stale snippet')\n```\n"
    )
    ALL_BLOCKS[md] = parse_blocks(md)
    try:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        with pytest.raises(pytest.fail.Exception, match=r"(?s)page.md:10: the documentation block failed.*stale"):
            run_file(md, cwd, False, tmp_path)
        md.write_text("```bash\nfalse\n```\n")
        ALL_BLOCKS[md] = parse_blocks(md)
        with pytest.raises(pytest.fail.Exception, match=r"page.md:1: .*exit status 3"):
            run_file(md, cwd, False, tmp_path)
    finally:
        del ALL_BLOCKS[md]


def test_every_not_executed_block_is_reported_with_its_reason():
    lines = not_executed()
    n_skip = sum(b.kind in ("python", "shell") and bool(b.skip) for bs in ALL_BLOCKS.values() for b in bs)
    assert sum(": " in line and " not run: " in line for line in lines) == n_skip
    assert all(line.split(": ", 1)[1].strip() for line in lines)


# ----------------------------------------------------------------------------------------------- the site
def _hook():
    spec = importlib.util.spec_from_file_location(
        "docs_config_reference", ROOT / "docs" / "hooks" / "config_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page in the nav, an unresolved API reference or a
    docstring the reference cannot render fails it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "shared_prefix_kernel" in page and "num_candidates" in page  # the generated reference is in the page


def test_every_config_field_is_documented():
    """Each field of each settings dataclass has a comment (its meaning) in its source; the configuration reference
    is generated from them, so a field added without one fails here."""
    hook = _hook()
    missing = [
        f"{cls.__module__}.{cls.__qualname__}.{name}"
        for cls in hook.settings_classes()
        for name, doc in hook.field_docs(cls).items()
        if not doc
    ]
    assert not missing, f"config fields without a comment: {missing}"


def test_field_comments_are_attributed_to_their_fields(tmp_path):
    src = '''from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Settings of a demo."""

    a: int = 1  # the first knob
    b: str = "x"  # a trailing comment that
    # wraps onto the next line
    c: float = 0.5  # its own comment
    # a block comment above d
    # on two lines
    d: list = field(default_factory=list)
    e: int | None = None

    # a comment above a method belongs to it
    def validate(self):
        pass
'''
    (tmp_path / "demo_config_mod.py").write_text(src)
    spec = importlib.util.spec_from_file_location("demo_config_mod", tmp_path / "demo_config_mod.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_config_mod"] = mod
    try:
        spec.loader.exec_module(mod)
        hook = _hook()
        assert hook.field_docs(mod.DemoConfig) == {
            "a": "the first knob",
            "b": "a trailing comment that wraps onto the next line",
            "c": "its own comment",
            "d": "a block comment above d on two lines",
            "e": "",
        }
        table = hook.class_table(mod.DemoConfig)
        assert "| `e` | `int | None` | `None` |  |" in table and "| `d` | `list` | `[]` |" in table
        assert "Settings of a demo." in table
    finally:
        del sys.modules["demo_config_mod"]


def test_the_reference_lists_every_settings_class():
    """Every dataclass named *Config / *Settings / *Arguments in the package is in the reference's list (a new one
    cannot be left out), and the reference holds each field with its default."""
    hook = _hook()
    listed = {(c.__module__, c.__qualname__) for c in hook.settings_classes()}
    found = set()
    for info in pkgutil.walk_packages([str(ROOT / "optimas_fast")], "optimas_fast."):
        try:
            mod = importlib.import_module(info.name)
        except ImportError as exc:  # an optional extra (vllm, flash-attn) that this environment lacks
            if "optimas_fast" in str(exc):
                raise
            continue
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == info.name
                and re.search(r"(Config|Settings|Arguments)$", obj.__name__)
            ):
                found.add((obj.__module__, obj.__qualname__))
    missing = found - listed
    assert not missing, f"settings dataclasses missing from docs/hooks/config_reference.py: {missing}"
    text = hook.config_reference_markdown()
    assert "### `TemplateConfig`" in text and "| `max_length` | `int` | `512` |" in text
