"""One exception type for every mistake a user can fix.

Anything raised as `FunGPTError` is shown by the command line as a single line,
`error: <message>`, with a non-zero exit and no traceback. The message should say
what is wrong and how to fix it, e.g.
    FunGPTError("data path 'foo.txt' does not exist: pass a text file, a folder or 'shakespeare'")
"""


class FunGPTError(Exception):
    """A user-facing error: bad input, bad config, missing file. Printed as one line."""
