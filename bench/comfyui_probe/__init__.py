"""A custom-node folder that bench/comfyui_bench.py links into the ComfyUI it starts (never a user's ComfyUI). It has
no nodes. Loaded by ComfyUI at start-up, it caps the process's GPU memory at DREAMBOOTH_BENCH_CAP_GIB, as on a smaller
card, and prints each node's time and peak GPU memory (on CUDA) as the node finishes:

    [bench] node 4 DBStudioTrain: 73.0 s, peak 5.10 GiB allocated / 5.32 GiB reserved
"""
import os
import time

import comfy.model_management
import execution
import torch

GIB = 2 ** 30
NODE_CLASS_MAPPINGS: dict = {}


def cap_memory(gib: float) -> None:
    if not gib or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))
    # ComfyUI plans what it keeps loaded by the card's free memory, which the cap does not change: the rest is
    # reserved, as --reserve-vram reserves it.
    comfy.model_management.EXTRA_RESERVED_VRAM = max(comfy.model_management.EXTRA_RESERVED_VRAM,
                                                     int(total - gib * GIB))


def measured(get_output_data):
    """ComfyUI's call of one node (execution.get_output_data), with its peak memory printed."""
    async def run_node(prompt_id, unique_id, obj, *args, **kwargs):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        try:
            return await get_output_data(prompt_id, unique_id, obj, *args, **kwargs)
        finally:
            memory = (f", peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB allocated / "
                      f"{torch.cuda.max_memory_reserved() / GIB:.2f} GiB reserved" if cuda else "")
            name = getattr(obj, "__name__", type(obj).__name__)
            print(f"[bench] node {unique_id} {name}: {time.monotonic() - started:.1f} s{memory}", flush=True)
    return run_node


cap_memory(float(os.environ.get("DREAMBOOTH_BENCH_CAP_GIB") or 0))
execution.get_output_data = measured(execution.get_output_data)
