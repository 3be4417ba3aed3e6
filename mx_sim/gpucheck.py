"""``python -m mx_sim.gpucheck``: fail fast, in one line, when a GPU run has no GPU."""

import os
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(
            f"mx-harness gpu env: no CUDA device visible (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "run tox -e gpu on a GPU runner",
            file=sys.stderr,
        )
        return 1
    print(f"mx-harness gpu env: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
