"""Recurrence cores (``gla``, ``delta_rule``, ``dplr``), LASP-2 kernels (``lasp``) and their backends.

Importing the package applies ``$LINEAR_MOE_AUTOTUNE_CONFIGS`` when it is set (see ``kernels.autotune``).
"""
from linear_moe.kernels.autotune import limit_autotune_from_env

limit_autotune_from_env()
