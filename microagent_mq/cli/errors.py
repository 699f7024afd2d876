"""Errors of the command line, and its exit codes."""

EXIT_OK = 0
EXIT_RUNTIME = 1  # the command was well formed but failed: broker down, bad DSN, a hook raised
EXIT_USAGE = 2  # the command itself is wrong: unknown option, bad value, module not found


class CLIError(Exception):
    """A problem worth one line on stderr, not a traceback; ``exit_code`` 2 (usage) by default."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
