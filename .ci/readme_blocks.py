"""Writes the runnable blocks of one Markdown file, and the runner that executes them, for another Python.

    .venv/bin/python .ci/readme_blocks.py README.md OUT_DIR   # -> OUT_DIR/blocks.json, OUT_DIR/runner.py
    OTHER_PYTHON OUT_DIR/runner.py OUT_DIR/blocks.json        # from any working directory

The wheel check (.ci/wheel-check) uses it to run the README's blocks with the wheel's Python from an empty
directory. The parsing and the runner are tests/test_docs.py's (one definition of what a block is and how blocks
run); blocks marked skip or repo-root are left out, as test_docs leaves them out of its empty-directory run.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_docs  # noqa: E402

path, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
blocks = [b for b in test_docs.parse_blocks(path) if b.kind and not b.skip and not b.repo_root_only]
(out / "blocks.json").write_text(
    json.dumps([{"where": b.where, "kind": b.kind, "text": b.text, "write": b.write} for b in blocks])
)
(out / "runner.py").write_text(test_docs._RUNNER)
print(f"{path.name}: {len(blocks)} runnable blocks", file=sys.stderr)
