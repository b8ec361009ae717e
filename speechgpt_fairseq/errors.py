"""The error a command prints as one line: a verdict on what the user gave it.

`speechgpt` turns an `InputError` (and a `FileNotFoundError` for a path the user named) into
`speechgpt VERB: error: MESSAGE`, exit status 1. Every other exception is a bug of ours or of a library and
keeps its traceback, so that it is seen and reported. `InputError` is a `ValueError`, so code calling the
Python API that catches ValueError keeps working.
"""
from __future__ import annotations


class InputError(ValueError):
    """The input (a file, a record in it, an option or argument) is not what the command takes; the message
    names it and says what was expected."""
