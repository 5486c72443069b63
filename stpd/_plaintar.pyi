# Types of the C module stpd/_plaintar.c (see there).

Buffer = bytes | bytearray | memoryview

def make_files(
    piece: Buffer, start: int, dir_fd: int, prefix: bytes, owner: bytes, uid: int, gid: int, /
) -> tuple[int, int]: ...
def pack_files(
    buffer: bytearray | memoryview,
    filled: int,
    dir_fd: int,
    prefix: bytes,
    names: list[str],
    first: int,
    mode: int,
    uid: int,
    gid: int,
    middle: bytes,
    tail: bytes,
    checksum: int,
    /,
) -> tuple[int, int]: ...
def scan_members(piece: Buffer, at: int, /) -> tuple[int, int]: ...
