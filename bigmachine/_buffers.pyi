ALIGNMENT: int
HUGEPAGE_MIN: int
HUGE_ALIGNMENT: int

class AlignedBuffer:
    size: int
    exports: int
    address: int
    def __init__(self, size: int) -> None: ...
    def __len__(self) -> int: ...

def aligned(size: int) -> memoryview: ...

class SharedMapping:
    size: int
    fd: int
    exports: int
    address: int
    def __init__(self, fd: int, size: int) -> None: ...
    def __len__(self) -> int: ...

def address_of(buf: object) -> int: ...
