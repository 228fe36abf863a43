"""The project's error base class: every error raised on purpose carries a message for users.

The command line turns any `DigitflowError` into one line, `error: MESSAGE`, and exit code 1
(see `cli.common.reported`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DigitflowError(Exception):
    """A failure the user can act on; str(error) says what went wrong and what was kept."""
