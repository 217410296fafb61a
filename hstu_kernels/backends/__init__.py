"""Kernel backends. Every module here registers itself with :mod:`hstu_kernels.dispatch` on
import; the registry imports them all on first use. A backend imports its toolkit lazily, so
that discovering it costs nothing where the toolkit is missing."""
