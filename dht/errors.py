"""The one base class every GPUFlex error derives from.

It lives in the lowest layer (``dht``) so that every package can raise a subclass of it
without importing a higher layer. The CLI turns any ``GPUFlexError`` into one clear line
and a non-zero exit code; anything else is a bug and keeps its traceback.
"""


class GPUFlexError(Exception):
    """Base class of all errors a user can cause and fix (bad input, unreachable peer, ...)."""
