"""Errors a user can fix; the CLI turns each into a one-line `click.ClickException`."""


class MapbuildError(Exception):
    """A user mistake or an unusable input: the message names the file, column or flag and the fix."""


def require(*checks: tuple[bool, str]) -> None:
    """Raise the message of the first failed (condition, message) check: config validation in `__post_init__`."""
    for ok, message in checks:
        if not ok:
            raise MapbuildError(message)
