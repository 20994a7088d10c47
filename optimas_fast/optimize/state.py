"""RunState: everything a killed run needs to continue exactly where its last finished iteration left it.

Layout of a run directory:

    run_state.json     written last, atomically (temp file, fsync, rename): iteration, system variables,
                       pair store, selector gaps, optimizer states, usage ledger, history, elapsed time,
                       and the name of the LRF checkpoint it goes with
    lrf-000007/        the RewardModel checkpoint of that iteration (weights, AdamW moments, replay
                       buffers, trainer RNG; see optimas_fast.reward.checkpoint)

An iteration writes its LRF checkpoint into a fresh ``lrf-<iteration>`` directory *before* the state file
that names it, and deletes older ones only after: a crash at any point leaves a state file whose LRF
checkpoint is complete. The loop's own randomness needs no saved state: iteration t draws from
``random.Random(f"{seed}:{t}")`` (seeded by a string, which Python hashes with SHA-512, never with the
per-process salted ``hash``), so a resumed iteration t+1 draws what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from optimas_fast._io import atomic_write_text

__all__ = ["RUN_STATE", "STATE_FORMAT", "save_run_state", "load_run_state", "lrf_dir_name"]

RUN_STATE = "run_state.json"
STATE_FORMAT = "optimas_fast.run_state/1"


def lrf_dir_name(iteration: int) -> str:
    return f"lrf-{iteration:06d}"


def save_run_state(run_dir: str | os.PathLike, state: dict, reward_model: Any, iteration: int) -> None:
    """LRF checkpoint into ``lrf-<iteration>/``, then ``run_state.json`` naming it, then old checkpoints go."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = lrf_dir_name(iteration)
    target = run_dir / name
    if target.exists():  # left by a run killed after writing it but before the state file: redo it
        shutil.rmtree(target)
    reward_model.save(target)
    state = dict(state, format=STATE_FORMAT, iteration=iteration, lrf_checkpoint=name)
    atomic_write_text(run_dir / RUN_STATE, json.dumps(state, sort_keys=True))
    for old in run_dir.glob("lrf-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_run_state(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {RUN_STATE} in {run_dir}: not a run directory, or the run was killed before "
            "its first checkpoint (start it again)"
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown run state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    return state
