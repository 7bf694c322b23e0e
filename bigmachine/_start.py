"""bm.start(), apart from the driver's session (_driver) so that a system's init
runs before the driver's modules are imported: a Local system's template (a
fresh interpreter importing numpy and bigmachine's machine side, the longest
step of a session's first call) then warms up while this process imports them
and makes its session."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .backends import System
from .errors import Error

if TYPE_CHECKING:
    from ._session import B


def start(system: Optional[System] = None, **options: Any) -> B:
    """Start a bigmachine session on system (default: bigmachine.Local()).

    options are the session's: tls, insecure, cert_lifetime, socket_buffer, busy_poll,
    shared_memory (arrays as shared memory between machines of one host),
    status_addr (serve a status page there, e.g. "127.0.0.1:0"), progress
    (progress bars on a terminal) and timing (keepalive_period, lost_after,
    lease, start_timeout). It returns the driver's session, a B.
    """
    if system is None:
        from .backends.local import Local
        system = Local()
    elif not isinstance(system, System):
        hint = f" (an instance: {system.__name__}())" if isinstance(system, type) and \
            issubclass(system, System) else ""
        raise Error(f"bm.start takes a system such as bm.Local(){hint}, not {system!r}")
    if options:
        system.configure(**options)
    system.check()
    try:
        system.init()
        from ._driver import Driver
    except BaseException:
        system.shutdown()
        raise
    return Driver(system)
