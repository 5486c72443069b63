# Types of the C module stpd/_tlsio.c (see there).

Buffer = bytes | bytearray | memoryview

READY: int
TIMED_OUT: int
READABLE: int
INTERRUPTED: int

def bind(read_address: int, write_address: int, error_address: int, /) -> None: ...
def set_wake_fd(fd: int, /) -> None: ...
def read_into(
    ssl: int, buffer: Buffer, offset: int, fd: int = -1, timeout_ms: int = -1, /
) -> tuple[int, int, int]: ...
def write_from(
    ssl: int, buffer: Buffer, fd: int = -1, timeout_ms: int = -1, watch_input: bool = False, /
) -> tuple[int, int, int]: ...
