"""The errors qwen3_sft.py turns into one line and an exit code instead of a traceback."""


class ConfigError(ValueError):
    """A flag, file or record that cannot be used; the message says which one and what to do. Exit code 2."""


class RunStopped(Exception):
    """The run ends before (or without) writing a final model, on purpose: a signal, divergence, or nothing left
    to train. The message says what happened and what to do next."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
