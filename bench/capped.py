"""The command line (python -m trainer ...) with this process's GPU memory capped, as on a smaller card.

    python bench/capped.py GIB -- pick-token --model ... | train ... | sample ...

torch.cuda.set_per_process_memory_fraction makes the caching allocator refuse anything beyond GIB, so a run that would
not fit an 8 GB card fails here as it would there. Used by bench/dreambooth_bench.py --whole-run; without CUDA the
cap is left out and the command runs as it is.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 2 ** 30


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python bench/capped.py GIB -- COMMAND [ARGS...]")
    cap = float(argv[0]) * GIB
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    from trainer.__main__ import main as trainer_main
    return trainer_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
