"""Errors that carry their own exit status, so the CLI can present them without tracebacks."""

from __future__ import annotations


class VmbuildError(Exception):
    """A failure explained for a person; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(VmbuildError):
    """Bad input from the user (a recipe, an option, a path): exit status 2."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe problem, located: `file:line: field: message`."""

    def __init__(self, file: str, line: int | None, field: str | None, message: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class BuildError(VmbuildError):
    """A build step failed (Packer, Ansible, disk assembly): exit status 1."""


class ValidationError(VmbuildError):
    """The image failed its lint or its boot test: exit status 3."""

    exit_code = 3
