"""Checkpoint I/O, split by direction: ``read`` (state dicts and lazy tensor sources from files,
directories and memory, with or without mmap), ``write`` (atomic files, permutations, provenance,
the planned sharded writer) and ``outputs`` (result directories claimed before work and written all
or nothing: the pipeline's sinks)."""

from permerge.io.outputs import OutputDir, write_files, write_result
from permerge.io.read import (
    MemorySource,
    TensorSource,
    checkpoint_hashes,
    file_sha256,
    load_state_dict,
    open_checkpoint,
)
from permerge.io.write import (
    atomic_path,
    atomic_write,
    check_not_input,
    load_permutation,
    prepare_output_dir,
    save_permutation,
    save_state_dict,
    write_provenance,
)

__all__ = [
    "MemorySource",
    "OutputDir",
    "TensorSource",
    "atomic_path",
    "atomic_write",
    "check_not_input",
    "checkpoint_hashes",
    "file_sha256",
    "load_permutation",
    "load_state_dict",
    "open_checkpoint",
    "prepare_output_dir",
    "save_permutation",
    "save_state_dict",
    "write_files",
    "write_provenance",
    "write_result",
]
