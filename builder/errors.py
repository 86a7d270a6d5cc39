"""Errors a user can fix; the CLI turns each into a one-line `click.ClickException`."""


class MapbuildError(Exception):
    """A user mistake or an unusable input: the message names the file, column or flag and the fix."""
