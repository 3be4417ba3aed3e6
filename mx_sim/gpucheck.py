"""``python -m mx_sim.gpucheck``: fail fast, in one line, when a GPU run has no GPU.

``tox -e gpu`` runs this before installing anything, so it imports nothing but torch.
"""

import os
import sys


def main() -> int:
    try:
        import torch
    except ImportError:
        print("mx-harness gpu env: torch is not installed in the runner's Python", file=sys.stderr)
        return 1
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        print(
            f"mx-harness gpu env: no CUDA device visible (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={visible}); run tox -e gpu on a GPU runner",
            file=sys.stderr,
        )
        return 1
    print(f"mx-harness gpu env: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
