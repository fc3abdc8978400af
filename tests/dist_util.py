"""Helpers of the two-process (gloo, CPU) tests, and of the trainer tests that kill a run."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for init_method="tcp://127.0.0.1:PORT"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_before_step(trainer, step: int) -> None:
    """Make `trainer` raise KeyboardInterrupt (a simulated kill) as step `step` begins: steps before it ran and
    saved as configured."""
    original = trainer.train_step

    def train_step(batch):
        if trainer.step == step:
            raise KeyboardInterrupt("simulated kill")
        return original(batch)

    trainer.train_step = train_step
