"""Command line of the convert step: ``python -m linear_moe.components.convert --help``.

Values come from, in rising priority: the defaults of :func:`convert`, the ``convert:`` section of
``--params`` (a params.yaml whose keys are the argument names), then the flags given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linear_moe.components import params
from linear_moe.components.convert.core import DIRECTIONS, convert, hf_to_megatron

SECTION = "convert"  # params.yaml section read by --params
#: direction -> (entry function, its input argument, its output argument)
ENTRIES = {
    "mcore-to-hf": (convert, "checkpoint", "output_dir"),
    "hf-to-mcore": (hf_to_megatron, "hf_dir", "output_checkpoint_dir"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m linear_moe.components.convert",
        description="Convert a training checkpoint (megatron dist_checkpointing, any TP/PP/EP layout) into a "
        "Hugging Face model directory (config.json, safetensors, tokenizer, generation_config.json), or a "
        "Hugging Face directory back into a training checkpoint.",
        argument_default=argparse.SUPPRESS,  # only given flags override params.yaml / defaults
    )
    p.add_argument("--params", type=Path, help=f"YAML file whose '{SECTION}:' section sets the options of "
                   "mcore-to-hf (keys = convert() argument names); flags given here win")
    p.add_argument("--direction", choices=DIRECTIONS, default="mcore-to-hf",
                   help="mcore-to-hf: training checkpoint -> Hugging Face directory (default); "
                   "hf-to-mcore: Hugging Face directory -> training checkpoint (step 0) for continued training")
    p.add_argument("--input", help="mcore-to-hf: a checkpoint step directory, or a train output dir whose "
                   "latest complete checkpoint is taken; hf-to-mcore: a Hugging Face model directory (required)")
    p.add_argument("--output", help="directory to write, replaced atomically: the Hugging Face model "
                   "(mcore-to-hf) or the checkpoint step directory with model/ and train_state.json "
                   "(hf-to-mcore) (required); an existing one must be empty or a previous output of the same direction "
                   "(holding config.json, resp. train_state.json)")
    p.add_argument("--tokenizer-dir", help="mcore-to-hf: directory with tokenizer.json (the tokenize step's "
                   "<dataset>/tokenizer) copied next to the weights (default: none, weights only)")
    p.add_argument("--shard-size", help="mcore-to-hf: largest safetensors file, e.g. 500MB or 2GB; bigger "
                   "models are sharded with model.safetensors.index.json (default: 2GB)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="mcore-to-hf: dtype of the exported weights (default: float32)")
    return p


def load_section(path: Path) -> dict:
    """The ``convert:`` section of a params YAML file, checked against :func:`convert`'s arguments and their types."""
    return params.load_section(path, SECTION, convert)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    direction = args.pop("direction", "mcore-to-hf")
    entry, input_name, output_name = ENTRIES[direction]
    try:
        kwargs = load_section(args.pop("params")) if "params" in args else {}
        if direction != "mcore-to-hf":
            given = sorted(k for k in args if k not in ("input", "output"))
            if given or kwargs:
                raise ValueError(f"--direction {direction} takes only --input and --output (got {given or '--params'})")
        renames = {"input": input_name, "output": output_name}
        kwargs.update({renames.get(k, k): v for k, v in args.items()})
        for flag, name in (("--input", input_name), ("--output", output_name)):
            if name not in kwargs:
                parser.error(f"{flag} is required (as a flag, or '{name}' in the params file)")
        result = entry(**kwargs)
    except ValueError as err:  # bad input or arguments: a message, not a traceback
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    print(result)
    return 0
