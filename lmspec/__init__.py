"""What both trainers share and neither framework owns: config, data and batch
order, LR schedule, FLOP counting, weight names, metrics record.

Imports neither jax nor torch.
"""

from lmspec.config import ConfigError, ExperimentConfig, load_config

__all__ = ["ConfigError", "ExperimentConfig", "load_config"]
