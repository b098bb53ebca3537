"""Old home of block tracing: everything now lives in `block_stream.py`; re-exported here for callers
not yet moved (the file goes when the engine's files are renamed)."""

from .block_stream import (  # noqa: F401
    BlockCall,
    BlockTrace,
    hooks,
    map_call,
    owned_hooks,
    run_block,
    slice_call,
    trace_blocks,
)
