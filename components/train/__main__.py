"""``python -m linear_moe.components.train`` / ``torchrun -m linear_moe.components.train``.

Every TrainConfig field except ``model_overrides`` is a flag (``--micro-batch-size 4``, ``--no-dvclive``);
``model_overrides`` is the repeated ``--model KEY=VALUE``, e.g. ``--model lsm_mixer=deltanet``.
Values come from the field defaults, then ``--config FILE`` (JSON/YAML), then ``--params params.yaml``
(its ``train:`` section); flags override them all, and ``--model`` entries merge over the files' overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from linear_moe.components.params import load_section
from linear_moe.components.train.config import TrainConfig



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m linear_moe.components.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON or YAML file of TrainConfig fields (flags override it)")
    p.add_argument("--params", help="params.yaml whose 'train:' section holds TrainConfig fields (over --config; "
                                     "flags override it)")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig override over the preset, value parsed as JSON when possible")
    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        # default=None marks "not given", so files keep their values; the help shows the field's own default.
        text = f"{comments.get(f.name, '')} (default: {_field_default(f)!r})".lstrip().replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    return p


def _field_default(f: dataclasses.Field) -> object:
    """The value a TrainConfig gets for ``f`` when nothing sets it."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _field_comments() -> dict[str, str]:
    """The one-line comment after each TrainConfig field, used as its --help text."""
    import inspect

    import linear_moe.components.train.config as module

    comments = {}
    for line in inspect.getsource(module.TrainConfig).splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            comments[name] = stripped.split("#", 1)[1].strip()
    return comments


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = parser().parse_args(argv)
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    if args.params:
        base.update(load_section(args.params, "train", (f.name for f in dataclasses.fields(TrainConfig))))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    overrides = dict(base.get("model_overrides") or {})
    for item in args.model:
        if "=" not in item:
            raise ValueError(f"--model {item!r}: expected FIELD=VALUE")
        key, raw = item.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    base["model_overrides"] = overrides
    return TrainConfig.from_dict(base)


def main(argv: list[str] | None = None) -> int:
    from linear_moe.components.train.loop import InputError, train

    try:
        config = config_from_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = train(config)
    except InputError as error:  # found by preflight, before any process group or model; other errors keep
        print(f"error: {error}", file=sys.stderr)  # their traceback
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per run, not one per torchrun rank
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
