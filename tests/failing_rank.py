"""Worker of tests/test_distributed.py: rank 1 dies (``kill``) or stalls (``hang``) while rank 0 waits in a collective.

Imports torch only, to start fast; the process group gets a timeout the way ``leanft.core.distributed.init_distributed``
sets it up (``python failing_rank.py KIND TIMEOUT_S`` under torchrun, or with RANK / WORLD_SIZE / MASTER_* set).
"""

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main(kind: str, timeout_s: float) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    dist.all_reduce(torch.ones(1))
    if dist.get_rank() == 1:
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)
    while True:
        dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
