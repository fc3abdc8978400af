"""Training: configs and presets, the trainer loop, optimizer, parallelism, checkpoints, metrics, export, demo.

    from fineviti.train import Trainer, preset
    trainer = Trainer(preset("tiny"))
    trainer.train()
    trainer.close()
"""

from fineviti.train.config import JobConfig, apply_cli_overrides, preset
from fineviti.train.trainer import Trainer, run

__all__ = ["JobConfig", "Trainer", "apply_cli_overrides", "preset", "run"]
