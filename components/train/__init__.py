"""The train step: megatron-core Linear-MoE training with resumable checkpoints."""
from linear_moe.components.train.config import TrainConfig


def train(config: TrainConfig | None = None, **fields):
    """Entry function shared by the CLI, dvc.yaml and the KFP component."""
    from linear_moe.components.train.loop import train as run

    return run(config if config is not None else TrainConfig.from_dict(fields))


__all__ = ["TrainConfig", "train"]
