"""quantc's own exceptions: the CLI turns them into one clear message and a non-zero exit."""


class QuantcError(Exception):
    """A problem the user can fix (bad input, infeasible budget, ...)."""


class ConfigError(QuantcError):
    """The budget YAML (or a plan file) is invalid. The message names the file, the key and the fix."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: " if file else ""
        at = f"`{key}`: " if key else ""
        super().__init__(f"{where}{at}{problem}")


_INTERRUPTS = 0       # SIGINT/SIGTERM seen by the CLI's handler (cli._terminate_like_ctrl_c)


def note_interrupt() -> None:
    global _INTERRUPTS
    _INTERRUPTS += 1


def interrupts() -> int:
    return _INTERRUPTS


def reraise_interrupt(e: BaseException, before: int) -> None:
    """Raise KeyboardInterrupt when `e` comes from one: a signal that lands while a library runs Python
    code for it (safetensors' reader calling into torch) can come out as that library's own error.
    `before`: interrupts() when the call began."""
    x = e
    while x is not None:
        if isinstance(x, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        x = x.__cause__ or x.__context__
    if interrupts() != before:
        raise KeyboardInterrupt from e
