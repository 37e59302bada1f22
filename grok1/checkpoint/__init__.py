"""The official Grok-1 checkpoint format (`ckpt-0/tensor{i:05d}_{host:03d}` pickles): read and write.

Reading never runs code from a file: pickles are scanned before anything is read
(`pickle_scan`, numpy only: the fuzzed surface), the folder is checked against the model's
tensors (`files`), tensors are read into host buffers (`reader`) and placed on devices
(`loading`); `writer` writes the format back. The names below are the checkpoint's public face.
"""

from grok1.checkpoint.errors import CheckpointError
from grok1.checkpoint.files import (CKPT_DIR, CONFIG_FILE, TensorSpec, checkpoint_dir, is_ckpt_folder,
                                    read_config, tensor_filename, tensor_specs)
from grok1.checkpoint.loading import load_params
from grok1.checkpoint.reader import iter_tensors, locate_tensor, read_tensor
from grok1.checkpoint.writer import quantize_params, save, write_tensor

__all__ = ["CKPT_DIR", "CONFIG_FILE", "CheckpointError", "TensorSpec", "checkpoint_dir", "is_ckpt_folder",
           "iter_tensors", "load_params", "locate_tensor", "quantize_params", "read_config", "read_tensor",
           "save", "tensor_filename", "tensor_specs", "write_tensor"]
