"""One rank of a 2-process gloo estimation (launched by tests/test_distributed.py).

argv: OUT MODE where MODE is causal | plain | source | causal1 (batches of one) | fail. Env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
Rank 0 saves the map to OUT; in ``fail`` mode rank 1 raises inside its forward pass at layer 1.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import acttransport as at  # noqa: E402
from conftest import make_llama, make_tokenizer, sentences  # noqa: E402


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model, tok = make_llama(layers=3), make_tokenizer()
    if mode == "fail" and dist.get_rank() == 1:
        def boom(*_):
            raise RuntimeError("boom on rank 1 at layer 1")
        model.model.layers[1].register_forward_hook(boom)
    src, tgt = sentences(23, 2, 100, seed=1), sentences(23, 150, 300, seed=2)  # 23: the shards differ in size
    kw = dict(causal=mode != "plain", condition="source" if mode == "source" else "both", batch_size=1 if mode == "causal1" else 4)
    tmap = at.estimate(model, tok, src, tgt, modules="@all-norms", progress=False, **kw)
    if dist.get_rank() == 0:
        tmap.save(out)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as acttransport's CLI does: gloo's threads can abort the interpreter's shutdown
