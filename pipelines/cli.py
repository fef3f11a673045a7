"""``python -m linear_moe.pipelines compile|run-local|submit``: the Linear-MoE KFP pipeline.

  compile    write the pipeline IR YAML (default linear-moe-pipeline.yaml)
  run-local  run tokenize -> train -> convert -> evaluate here with kfp.local (in-process training)
  submit     compile and start a run on a Kubeflow Pipelines host; prints the run URL

Pipeline parameters (run-local, submit) are flags named like the parameters, e.g.
``--preset tiny --lsm-mixer deltanet --tensor-parallel 2 --nodes 2 --gpus-per-node 8 --cpu-per-node 32
--memory-per-node 400Gi --use-trainjob``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from linear_moe.pipelines.pipeline import DEFAULTS, ClusterOptions, Resources

PARAM_HELP = {
    "preset": "model preset (linear_moe.model.config.PRESETS)",
    "lsm_mixer": "LSM mixer registry name (gla, deltanet, ...)",
    "layer_pattern": "one symbol per layer (L/l LSM, A/a attention; upper case = MoE); empty = the preset's",
    "tensor_parallel": "tensor-parallel size", "pipeline_parallel": "pipeline-parallel size",
    "expert_parallel": "expert-parallel size", "sequence_parallel": "LASP-2 sequence-parallel size",
    "model_overrides": 'JSON object of ModelConfig fields over the preset, e.g. \'{"hidden_size": 128}\'',
    "steps": "optimizer steps", "seq_length": "tokens per training sample",
    "micro_batch_size": "samples per micro-batch per data-parallel rank",
    "global_batch_size": "samples per optimizer step",
    "reset_at_eod": "each document its own sequence: recurrent states restart after every EOD token",
    "lr": "peak learning rate (cosine decay to lr/10)",
    "seed": "seed of the data split, model init, data order and evaluation",
    "save_interval": "steps between checkpoints (0: only the final one)",
    "eval_interval": "steps between validation losses (0: none)",
    "max_bytes": "tokenize only the first documents up to this many bytes (0 = all)",
    "eval_tasks": "'builtin' (held-out perplexity, cloze, choice) and/or lm-eval task names, comma-separated",
    "eval_limit": "examples per evaluation task (a fraction if < 1; 0 = all)",
    "eval_batch_size": "lm-eval batch size", "eval_num_samples": "greedy generations shown in the report",
    "vocab_size": "BPE vocabulary size trained by the tokenize step",
    "data_location": "corpus directory/glob/URI; empty = the shakespeare texts in the image",
    "nodes": "training nodes (TrainJob numNodes)", "gpus_per_node": "GPUs per node; 0 = CPU, one process per node",
    "cpu_per_node": "CPU request = limit per TrainJob node, a Kubernetes quantity (\"32\", \"500m\"); empty = the "
                    "runtime's (GPU jobs: set it, since their GPU limit makes Trainer drop all runtime resources)",
    "memory_per_node": "memory request = limit per TrainJob node, a Kubernetes quantity (\"400Gi\"); empty = the "
                       "runtime's (GPU jobs: set it, as for --cpu-per-node)",
    "use_trainjob": "train through a Kubeflow Trainer TrainJob (cluster); otherwise in the pipeline pod",
    "trainjob_image": "image of the TrainJob's training pods", "trainjob_namespace": "namespace of the TrainJob",
    "workspace_pvc": "PVC shared by the train step and its TrainJob (mounted at /workspace)",
}


def _add_pipeline_params(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("pipeline parameters")
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                               help=PARAM_HELP[name])
        else:
            group.add_argument(flag, dest=name, type=type(default), default=default, help=PARAM_HELP[name])


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-gpus", type=int, default=0, choices=(0, 1),
                   help="GPUs for the train pod itself (in-pod training, use_trainjob off), which trains as one "
                        "process: 0 or 1. More GPUs: --use-trainjob with --nodes/--gpus-per-node (the TrainJob "
                        "asks for its own, so leave 0 then)")
    p.add_argument("--no-cache", dest="enable_caching", action="store_false",
                   help="disable KFP caching of every step (default: caching on)")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help already states the default or there is none to show;
    a switch's default reads "on" or "off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.required:
            return text
        if action.default == "":
            return text + ' (default: "")'
        if isinstance(action.default, bool):
            return text + f" (default: {'on' if action.default else 'off'})"
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m linear_moe.pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{compile,run-local,submit}")
    fmt = _DefaultsHelpFormatter

    c = sub.add_parser("compile", help="write the pipeline IR YAML", formatter_class=fmt)
    c.add_argument("--output", "-o", default="linear-moe-pipeline.yaml", help="IR YAML path")
    _add_placement(c)

    r = sub.add_parser("run-local", help="run the pipeline here with kfp.local", formatter_class=fmt)
    r.add_argument("--pipeline-root", default="runs/kfp-local", help="where task outputs land")
    _add_pipeline_params(r)

    s = sub.add_parser("submit", help="compile and start a run on a KFP host; prints the run URL", formatter_class=fmt)
    s.add_argument("--host", required=True, help="KFP API URL, e.g. https://kubeflow.example.com/pipeline")
    s.add_argument("--namespace", dest="kfp_namespace", default=None,
                   help="KFP (profile) namespace of the run (default: the client's)")
    s.add_argument("--experiment", default="linear-moe", help="experiment name (created if missing)")
    s.add_argument("--run-name", default=None, help="run name (default: KFP's)")
    s.add_argument("--token", default=None, help="bearer token for the KFP API (default: the client's own auth)")
    s.add_argument("--service-account", default="linear-moe-launcher",
                   help="service account of the run's pods (k8s/ grants it TrainJob rights)")
    _add_placement(s)
    _add_pipeline_params(s)
    return p


def _options(args: argparse.Namespace) -> ClusterOptions:
    options = ClusterOptions(enable_caching=args.enable_caching)
    if args.train_gpus:
        options.resources["train"] = Resources(cpu_request="8", cpu_limit="16", memory_request="64G",
                                               memory_limit="128G", gpus=args.train_gpus)
    return options


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in DEFAULTS}


def validate_arguments(arguments: dict[str, Any]) -> None:
    """Fail before submitting: the train step's whole TrainConfig (model preset/mixer/pattern/overrides
    included), its parallel sizes and batch sizes vs the processes that will train (nodes * GPUs with
    a TrainJob, else the pipeline pod's one) and the TrainJob's per-node CPU/memory quantities."""
    from linear_moe.pipelines.train_step import PARALLEL_FIELDS, train_config
    from linear_moe.pipelines.trainjob import procs_per_node, resource_quantity

    config = train_config(arguments)
    if arguments["use_trainjob"]:
        config.data_parallel(arguments["nodes"] * procs_per_node(arguments["gpus_per_node"]))
    else:
        parallel = {name: getattr(config, name) for name in PARALLEL_FIELDS if getattr(config, name) > 1}
        if parallel:
            raise ValueError(
                f"{', '.join(f'{name}={size}' for name, size in parallel.items())}: without --use-trainjob the train "
                "step runs in the pipeline pod as one process (--nodes and --gpus-per-node size the TrainJob only); "
                "keep every parallel size at 1, or pass --use-trainjob")
        config.data_parallel(1)
    for name in ("cpu_per_node", "memory_per_node"):
        resource_quantity(name, arguments[name])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "compile":
            from linear_moe.pipelines.pipeline import compile_pipeline

            print(compile_pipeline(args.output, _options(args)))
        elif args.command == "run-local":
            from linear_moe.pipelines.local import run_local

            arguments = _arguments(args)
            validate_arguments(arguments)
            print(run_local(arguments, args.pipeline_root))
        else:
            from linear_moe.pipelines.pipeline import compile_pipeline
            from linear_moe.pipelines.submit import check_reachable, submit

            arguments = _arguments(args)
            if args.train_gpus and arguments["use_trainjob"]:
                raise ValueError(f"--train-gpus {args.train_gpus} asks GPUs for the train pod, which only waits for the "
                                 "TrainJob with --use-trainjob: drop --train-gpus (the job asks for --gpus-per-node)")
            validate_arguments(arguments)
            check_reachable(args.host)
            with tempfile.TemporaryDirectory() as tmp:
                package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), _options(args))
                print(submit(package, args.host, arguments, namespace=args.kfp_namespace, experiment=args.experiment,
                             run_name=args.run_name, token=args.token, service_account=args.service_account,
                             enable_caching=None if args.enable_caching else False, check_host=False))
    except (ValueError, ImportError, ConnectionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
