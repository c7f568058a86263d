"""The one error type that means "the user's input is wrong": qwen3_sft.py prints it as a single line and exits 2."""


class ConfigError(ValueError):
    """A flag, file or record that cannot be used; the message says which one and what to do."""
