"""Output buffers shared by both backends."""
import torch


def accumulation_dtype(*dtypes):
    """float64 when any input is float64 (so gradcheck can run through the kernels), else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def gradient_buffer(student, inplace, need_grad):
    """Where the student gradient goes: nowhere, the student's own storage, or a fresh tensor."""
    if not need_grad:
        return None
    return student if inplace else torch.empty(student.shape, dtype=student.dtype, device=student.device)
