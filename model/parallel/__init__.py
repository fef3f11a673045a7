"""Parallelism applied around the single-device model: sequence parallelism (LASP-2 / LASP-2H)."""
from linear_moe.model.parallel.collectives import CollectiveLog, all_gather_sequence, count_collectives
from linear_moe.model.parallel.halo import active_sequence_parallel, global_positions, local_offsets, previous_tokens
from linear_moe.model.parallel.sequence_parallel import (
    SequenceParallelContext,
    current_sequence_parallel,
    exchange_states,
    lasp2_attention,
    lasp2_delta_rule,
    lasp2_dplr,
    lasp2_gla,
    local_segments,
    use_sequence_parallel,
)

__all__ = [
    "SequenceParallelContext", "current_sequence_parallel", "use_sequence_parallel", "exchange_states",
    "lasp2_gla", "lasp2_delta_rule", "lasp2_attention", "local_segments", "count_collectives",
    "CollectiveLog", "all_gather_sequence", "lasp2_dplr", "active_sequence_parallel", "previous_tokens",
    "global_positions", "local_offsets",
]
