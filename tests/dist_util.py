"""Helpers of the two-process (gloo, CPU) tests, and of the trainer tests that kill a run."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for init_method="tcp://127.0.0.1:PORT"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_until(trainer, crash_at: int | None = None):
    """Train `trainer` to its end, or, with crash_at, until a simulated kill (KeyboardInterrupt) as step crash_at
    begins (the steps before it ran and saved as configured); closes it either way and returns it."""
    if crash_at is not None:
        original = trainer.train_step

        def train_step(batch, **kwargs):
            if trainer.step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            return original(batch, **kwargs)

        trainer.train_step = train_step
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    finally:
        trainer.close()
    return trainer
