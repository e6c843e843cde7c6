"""`python -m fungpt ...` is the same as the `fungpt` command (torchrun uses this form)."""

from fungpt.cli import entry

entry()
