"""KFP v2 component of the convert step: artifact paths -> :func:`convert` arguments.

``checkpoint`` is the train step's output (its latest complete checkpoint is exported), ``dataset``
the tokenize step's output (its ``tokenizer/`` is copied next to the weights). Heavy imports live
inside the body so that compiling a pipeline stays fast.
"""
from kfp import dsl

from linear_moe.pipelines.images import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE)
def convert_component(
    checkpoint: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    hf_model: dsl.Output[dsl.Model],
    shard_size: str = "2GB",
    dtype: str = "float32",
):
    """Export ``checkpoint`` as a Hugging Face model directory at ``hf_model``."""
    import os

    from linear_moe.components.convert import convert

    convert(checkpoint.path, hf_model.path, os.path.join(dataset.path, "tokenizer"), shard_size=shard_size,
            dtype=dtype)
    hf_model.metadata["format"] = "huggingface-safetensors"
