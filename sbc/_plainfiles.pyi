# Types of the C module sbc/_plainfiles.c (see there).

Buffer = bytes | bytearray | memoryview

def make_files(
    piece: Buffer, start: int, dir_fd: int, prefix: bytes, owner: bytes, uid: int, gid: int, /
) -> tuple[int, int]: ...
