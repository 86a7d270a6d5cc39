"""Errors a user can fix: each message is one line naming the file, column or flag, and the fix. The CLI and the
kernel each turn the base class into that line in one place."""


class MapbuildError(Exception):
    """A user mistake or an unusable input."""


class InputError(MapbuildError, ValueError):
    """An input file the runtime cannot use."""


class BundleError(MapbuildError, ValueError):
    """A bundle that cannot be used at all."""


class EnvironmentFault(MapbuildError, RuntimeError):
    """The kernel's Python environment cannot run the bundle."""
