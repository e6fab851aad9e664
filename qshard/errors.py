"""The one exception type for user-facing problems: what went wrong, where, and how to fix it."""

from __future__ import annotations


class QShardError(Exception):
    """A problem the user can fix. Raised before expensive work wherever possible.

    `where` names the file, line/row or recipe option; `fix` says what to do instead.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)
