"""``optimas-fast reward train | eval | score | export``: the reward engine from the command line.

    optimas-fast reward train --data train.jsonl [--data more.parquet] [--eval-data held_out.jsonl] --out rm/ \\
        [--format auto|trl|optimas|pairs] [--components components.yaml] [--backbone minilm|PATH] \\
        [--config args.yaml] [--epochs N] [--lr X] [--batch-size N] [--max-length N] [--bf16 | --no-bf16] [--resume]
    optimas-fast reward eval rm/ --data held_out.jsonl          # -> one JSON object (accuracy, margin, n, ...)
    optimas-fast reward score rm/ --data rows.jsonl --out scores.jsonl
    optimas-fast reward export rm/ --hf hf_out/

``train`` runs ``RewardTrainer`` (TRL's RewardConfig names; ``--config`` is a YAML mapping of them, the flags
override it) with checkpoints in ``--out``/checkpoint-N/ (a killed run loses at most the steps since the last
one; ``--resume`` continues from it), writes the final model into ``--out`` itself (``reward eval/score/export
--out`` read it) and ``--out``/train_report.json, and prints that report as the last line of stdout. ``train`` and
``eval`` drop pairs longer than max_length by default, as TRL does (``--overlong``; see OVERLONG_DEFAULT). Progress
goes to stderr. Every bad argument, file or row exits with status 2 and one line on stderr that names it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimas_fast._io import iter_jsonl
from optimas_fast.render import format_fields

log = logging.getLogger("optimas_fast.cli.reward")

REPORT_NAME = "train_report.json"


class UsageError(ValueError):
    """A bad command-line argument (exit status 2)."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2), as the rest of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------- helpers
def _fail(cmd: str, exc: BaseException) -> int:
    msg = " ".join(str(exc).split())  # one line, whatever the message held
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    print(f"optimas-fast reward {cmd}: {msg}", file=sys.stderr)
    return 2


def _existing(paths: Sequence[str], flag: str) -> list[str]:
    for p in paths:
        if not os.path.exists(p):
            raise UsageError(f"{flag} {p}: no such file or directory")
    return list(paths)


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse


def _load_yaml(path: str) -> dict:
    import yaml

    from optimas_fast.run import read_yaml  # reads learning_rate: 1e-5 as a number (YAML 1.2), as run configs

    try:
        with open(path, encoding="utf-8") as f:
            raw = read_yaml(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(
            f"--config {path}: must be a mapping of RewardConfig (TRL) argument names, got {type(raw).__name__}"
        )
    return raw


def _load_model(path: str):
    from optimas_fast.reward import RewardModel

    if not os.path.isdir(path):
        raise UsageError(f"model directory {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise UsageError(
            f"model directory {path}: no manifest.json (not a reward checkpoint written by "
            "'optimas-fast reward train' or RewardModel.save)"
        )
    return RewardModel.load(path)


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- train
# Pairs longer than max_length, in `reward train` and `reward eval` alike: dropped (counted in the report). These
# commands are the TRL face (RewardTrainer, TRL's data and names), and TRL drops such pairs; eval must treat them as
# train did, or a model would be scored on pairs cut in a way it never trained on. The engine's own loops
# (RewardModel.train / adapt, the Optimas loop) truncate the prefix instead: their pairs come from the loop's own
# rollouts, where every pair carries signal and the outputs (the suffix) are what is judged.
OVERLONG_DEFAULT = "drop"


def _train_args(a) -> Any:
    from optimas_fast.trl import RewardConfig

    cfg = _load_yaml(a.config) if a.config else {}
    names = {f for f in RewardConfig.__dataclass_fields__}
    bad = sorted(k for k in cfg if k not in names)
    if bad:
        raise UsageError(
            f"--config {a.config}: unknown key(s) {', '.join(map(repr, bad))}; allowed (TRL RewardConfig "
            f"names): {', '.join(sorted(names))}"
        )
    if "output_dir" in cfg and os.path.normpath(str(cfg["output_dir"])) != os.path.normpath(a.out):
        log.warning("--config output_dir=%r is replaced by --out %r", cfg["output_dir"], a.out)
    cfg["output_dir"] = a.out
    for flag, key in (
        ("epochs", "num_train_epochs"),
        ("lr", "learning_rate"),
        ("batch_size", "per_device_train_batch_size"),
        ("max_length", "max_length"),
        ("bf16", "bf16"),
    ):
        v = getattr(a, flag)
        if v is not None:
            cfg[key] = v
    cfg.setdefault("disable_tqdm", a.no_progress)
    try:
        return RewardConfig(**cfg)
    except (TypeError, ValueError) as exc:
        where = f"--config {a.config}" if a.config else "arguments"
        raise UsageError(f"{where}: {exc}") from None


def _cmd_train(a) -> int:
    from optimas_fast.reward.trl_trainer import RewardTrainer, last_checkpoint

    data = _existing(a.data, "--data")
    eval_data = _existing(a.eval_data or [], "--eval-data")
    if a.components:
        _existing([a.components], "--components")
    args = _train_args(a)
    out = Path(a.out)
    ckpt = last_checkpoint(out)
    if a.resume and ckpt is None:
        raise UsageError(f"--resume: {out} has no checkpoint to continue from (checkpoint-N/ with trainer_state.json)")
    if not a.resume and ckpt is not None:
        raise UsageError(
            f"--out {out} already holds checkpoints ({os.path.basename(ckpt)}): pass --resume to continue "
            "that run, or choose a new --out"
        )
    t0 = time.perf_counter()
    trainer = RewardTrainer(
        model=a.backbone,
        args=args,
        train_dataset=data,
        eval_dataset=eval_data or None,
        components=a.components,
        overlong=a.overlong,
        data_format=a.format,
    )
    result = trainer.train(resume_from_checkpoint=True if a.resume else None)
    trainer.save_model(out)
    m = result.metrics
    report: dict[str, Any] = {
        "pairs_used": m["pairs_used"],
        "pairs_dropped": m["pairs_dropped"],
        "pairs_truncated": m["pairs_truncated"],
        "steps": m["steps"],
        "pairs_per_s": m["pairs_per_s"],
        "final_loss": m["final_loss"],
        "train_loss": m["train_loss"],
        "epochs": m["epoch"],
        "seconds": time.perf_counter() - t0,
        "components": list(trainer.model.encoder.components),
        "margin_kind": trainer.margin_kind,
        "overlong": a.overlong,
        "out": str(out),
        "last_checkpoint": last_checkpoint(out),
        "resumed_from": ckpt if a.resume else None,
        "args": {
            k: v
            for k, v in args.to_dict().items()
            if k
            in (
                "learning_rate",
                "per_device_train_batch_size",
                "num_train_epochs",
                "max_steps",
                "max_length",
                "lr_scheduler_type",
                "bf16",
                "seed",
            )
        },
    }
    if trainer.eval_pairs:
        report["eval"] = _eval_report(
            trainer.model,
            trainer.eval_pairs,
            trainer._raw_eval.margin_kind == "subtract",
            args.center_rewards_coefficient or 0.0,
        )
        report["eval_pairs_dropped"] = trainer.eval_dropped
    from optimas_fast._io import atomic_write_text

    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- eval
def _eval_report(model, pairs, subtract_margin: bool, center: float = 0.0) -> dict:
    """``RewardModel.evaluate``'s pair metrics (metrics.pair_metrics: accuracy with ties counting half, loss,
    margin), overall and per component, each block with ``n`` (its pairs) as this command has always printed."""
    m = model.evaluate(pairs, subtract_margin=subtract_margin, center=center)

    def block(b: dict) -> dict:
        return {"n": b["n_pairs"], "loss": b["loss"], "accuracy": b["accuracy"], "margin": b["margin"]}

    return {**block(m), "per_component": {c: block(cm) for c, cm in m["per_component"].items()}}


def _cmd_eval(a) -> int:
    from optimas_fast.reward.trl_trainer import filter_overlong, to_pairs

    data = _existing(a.data, "--data")
    model = _load_model(a.model_dir)
    pairs = to_pairs(
        data,
        "--data",
        model.encoder.tokenizer,
        a.components,
        a.format,
        component=model.encoder.components[0] if len(model.encoder.components) == 1 else None,
    )
    unknown = sorted({p.component for p in pairs} - set(model.encoder.components))
    if unknown:
        raise UsageError(
            f"--data: component(s) {unknown} have no head in {a.model_dir} (its components: {model.encoder.components})"
        )
    max_length = model.encoder.config.template.max_length
    kept, dropped, truncated = filter_overlong(model, pairs, max_length, a.overlong, "--data")
    t0 = time.perf_counter()
    res = _eval_report(model, kept, pairs.margin_kind == "subtract")
    res.update(pairs_dropped=dropped, pairs_truncated=truncated, seconds=time.perf_counter() - t0)
    _stderr_line(f"eval: {res['n']} pairs, {res['n'] / max(res['seconds'], 1e-9):.1f} pairs/s")
    print(json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- score
def _read_rows(path: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of a JSONL / JSON / CSV / Parquet file; where = "FILE line N" / "FILE row N"."""
    p = Path(path)
    suffix = p.suffix.lower()
    rows: list[tuple[str, dict]] = []
    if suffix == ".jsonl":
        rows = [(f"{p} line {i}", row) for i, row in iter_jsonl(p)]  # JSONLineError (a ValueError) names the line
    elif suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        raw = raw.get("rows", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, list):
            raise ValueError(f'{p}: a JSON file of rows must hold a list (or {{"rows": [...]}})')
        rows = [(f"{p} row {i}", r) for i, r in enumerate(raw)]
    elif suffix == ".csv":
        import csv

        with open(p, encoding="utf-8", newline="") as f:
            rows = [(f"{p} line {i}", dict(r)) for i, r in enumerate(csv.DictReader(f), 2)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{p} row {i}", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
    else:
        raise ValueError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: a row must be an object, got {type(r).__name__}")
    return rows


def _as_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a component's inputs / outputs as fields: rendered as the loaders render them
        return format_fields(value)
    raise ValueError(f"{where}: field {name!r} must be a string or an object of fields, got {type(value).__name__}")


def _cmd_score(a) -> int:
    from optimas_fast.reward.trl_trainer import to_pairs

    data = _existing([a.data], "--data")[0]
    model = _load_model(a.model_dir)
    rows = _read_rows(data)
    if not rows:
        raise UsageError(f"--data {data}: no rows")
    single = [(w, r) for w, r in rows if "outputs" in r]
    pair_rows = [(w, r) for w, r in rows if "outputs" not in r]
    requests, req_of = [], []  # (component, inputs, outputs) per request; (row index, output key) per request
    default = model.encoder.components[0] if len(model.encoder.components) == 1 else None
    for i, (where, r) in enumerate(rows):
        if "outputs" not in r:
            continue
        comp = r.get("component", default)
        if comp is None:
            raise ValueError(
                f"{where}: field 'component' is missing (the model has {len(model.encoder.components)} heads: "
                f"{model.encoder.components})"
            )
        if comp not in model.encoder.components:
            raise ValueError(f"{where}: field 'component': {comp!r} has no head (known: {model.encoder.components})")
        if "inputs" not in r:
            raise ValueError(f"{where}: field 'inputs' is missing")
        requests.append((comp, _as_text(r["inputs"], where, "inputs"), _as_text(r["outputs"], where, "outputs")))
        req_of.append((i, "score"))
    if pair_rows:  # TRL / Optimas / own pair rows: the loaders render them exactly as training did
        pos = [i for i, (_, r) in enumerate(rows) if "outputs" not in r]
        # all rows are pairs: load the file itself, so errors name its own lines
        source = data if not single else [r for _, r in pair_rows]
        pairs = to_pairs(source, data, model.encoder.tokenizer, None, a.format, component=default)
        if len(pairs) != len(pair_rows):
            raise ValueError(
                f"--data {data}: {len(pair_rows) - len(pairs)} pair row(s) carry no preference (ties) "
                "and cannot be scored as pairs"
            )
        for i, p in zip(pos, pairs, strict=True):
            if p.component not in model.encoder.components:
                raise ValueError(
                    f"{rows[i][0]}: field 'component': {p.component!r} has no head (known: {model.encoder.components})"
                )
            requests += [(p.component, p.inputs, p.chosen), (p.component, p.inputs, p.rejected)]
            req_of += [(i, "score_chosen"), (i, "score_rejected")]
    t0 = time.perf_counter()
    scores = model.score(requests).tolist()  # the scheduler path: dedupe, token-budget batches, prefix sharing
    dt = time.perf_counter() - t0
    out_rows = [dict(r) for _, r in rows]
    for (i, key), s in zip(req_of, scores, strict=True):
        out_rows[i][key] = s
    from optimas_fast._io import atomic_write_text

    atomic_write_text(a.out, "".join(json.dumps(r) + "\n" for r in out_rows))
    rep = model.last_report
    _stderr_line(
        f"score: {len(rows)} rows ({len(requests)} scored texts) in {dt:.2f} s, "
        f"{len(rows) / max(dt, 1e-9):.1f} rows/s, {len(requests) / max(dt, 1e-9):.1f} texts/s"
        + (f", {rep.n_unique} unique, prefix sharing {rep.prefix_sharing}" if rep is not None else "")
    )
    print(
        json.dumps(
            {
                "rows": len(rows),
                "texts": len(requests),
                "seconds": dt,
                "rows_per_s": len(rows) / max(dt, 1e-9),
                "out": a.out,
            }
        ),
        flush=True,
    )
    return 0


# ----------------------------------------------------------------------------------------------- export
def _cmd_export(a) -> int:
    try:
        from optimas_fast.reward.hf_export import export_hf
    except ImportError as exc:
        raise UsageError(f"export is not available in this build (optimas_fast.reward.hf_export: {exc})") from None
    model = _load_model(a.model_dir)
    info = export_hf(model.encoder, a.hf)
    print(json.dumps(info if isinstance(info, dict) else {"out": a.hf}, default=str), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- parser
_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "score": _cmd_score, "export": _cmd_export}


def _run(args) -> int:
    cmd = args.reward_command
    try:
        return _COMMANDS[cmd](args)
    except (
        UsageError,
        ValueError,
        TypeError,
        KeyError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as exc:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("reward %s failed", cmd, exc_info=True)
        return _fail(cmd, exc)


def add_reward_parser(sub) -> argparse.ArgumentParser:
    """Register ``reward`` (train / eval / score / export) on the main CLI's sub-parsers."""
    p = sub.add_parser(
        "reward",
        help="train, evaluate, score with and export a reward model (TRL / Optimas data)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rs = p.add_subparsers(dest="reward_command", required=True, parser_class=_OneLineParser)
    fmt = dict(
        choices=["auto", "trl", "optimas", "pairs"], default="auto", help="data layout (default auto: by columns)"
    )
    overlong = dict(
        choices=["truncate_prefix", "drop", "error"],
        default=OVERLONG_DEFAULT,
        help="pairs longer than the model's max_length: drop the pair (counted; the default, TRL's way, the same in "
        "train and eval), shorten the prompt (counted; RewardModel.train's and the Optimas loop's way) or stop "
        "with an error",
    )

    t = rs.add_parser("train", help="train a reward model (RewardTrainer) on preference data")
    t.add_argument("--data", action="append", required=True, metavar="FILE", help="training data (repeatable)")
    t.add_argument("--eval-data", action="append", metavar="FILE", help="held-out data (repeatable)")
    t.add_argument("--format", **fmt)
    t.add_argument("--components", metavar="FILE", help="JSON / YAML mapping component name -> description")
    t.add_argument("--backbone", default="minilm", help="'minilm' (default) or a local Hugging Face model directory")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, final model, report)")
    t.add_argument("--config", metavar="YAML", help="RewardConfig (TRL) arguments as a YAML mapping")
    t.add_argument("--epochs", type=_positive(float), help="num_train_epochs")
    t.add_argument("--lr", type=_positive(float), help="learning_rate")
    t.add_argument("--batch-size", type=_positive(int), help="per_device_train_batch_size")
    t.add_argument("--max-length", type=_positive(int), help="max_length (tokens per row)")
    t.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast training (default: the engine's: bf16 on CUDA and on CPUs with native bf16 "
        "matmul, "
        "else fp32)",
    )
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--overlong", **overlong)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = rs.add_parser("eval", help="held-out pairwise accuracy / margin of a trained model -> JSON")
    e.add_argument("model_dir", metavar="DIR", help="a model written by 'reward train' (or a checkpoint-N/)")
    e.add_argument("--data", action="append", required=True, metavar="FILE", help="held-out data (repeatable)")
    e.add_argument("--format", **fmt)
    e.add_argument("--components", metavar="FILE", help="JSON / YAML mapping component name -> description")
    e.add_argument("--overlong", **overlong)

    s = rs.add_parser("score", help="score rows ({component, inputs, outputs}) or pairs (TRL rows) -> JSONL")
    s.add_argument("model_dir", metavar="DIR", help="a model written by 'reward train' (or a checkpoint-N/)")
    s.add_argument("--data", required=True, metavar="FILE", help="rows to score (.jsonl / .json / .csv / .parquet)")
    s.add_argument("--out", required=True, metavar="FILE", help="scores.jsonl: every row with its score(s)")
    s.add_argument("--format", **fmt)

    x = rs.add_parser("export", help="export a standard Hugging Face checkpoint")
    x.add_argument("model_dir", metavar="DIR", help="a model written by 'reward train'")
    x.add_argument("--hf", required=True, metavar="OUT", help="output directory")
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m optimas_fast.cli_reward train ...`` (the same as ``optimas-fast reward train ...``)."""
    parser = _OneLineParser(prog="optimas-fast")
    add_reward_parser(parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser))
    args = parser.parse_args(["reward", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
