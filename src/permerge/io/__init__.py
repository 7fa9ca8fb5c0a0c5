"""Checkpoint I/O: read state dicts (safetensors, torch pickles, Hugging Face directories, lazily or
whole) and write them, permutations and provenance atomically without touching the inputs."""

from permerge.io.read import (
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
    "write_provenance",
]
