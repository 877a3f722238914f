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
