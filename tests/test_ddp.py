"""DDP on CPU: two gloo processes give the same weights as one process with the same global batch."""
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

STEPS, FINETUNE = 3, 2  # crosses the switch to the unmasked phase (mask token frozen, DDP rebuilt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out, arch="maskdit"):
    from test_train import tiny_cfg

    return tiny_cfg(out, steps=STEPS, finetune_steps=FINETUNE, batch_size=8, log_every=1, arch=arch)


def _worker(rank: int, world: int, port: int, out: str, arch: str):
    import torch.distributed as dist

    from fastmask.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tr = train(_cfg(out, arch), progress=False)
        if rank == 1:  # rank 1 writes nothing; hand its weights back for the comparison
            torch.save({k: v.clone() for k, v in tr.net.state_dict().items()}, Path(out) / "rank1.pt")
    finally:
        dist.destroy_process_group()


# TREAD: routed ids drawn for the global batch, sliced; SPRINT: its path-drop flags too
@pytest.mark.parametrize("arch", ["maskdit", "tread", "sprint"])
def test_two_gloo_ranks_match_one_process(tmp_path, arch):
    from fastmask.checkpoint_io import load_checkpoint
    from fastmask.train import train

    out2 = tmp_path / "ddp"
    out2.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out2), arch), nprocs=2, join=True)

    one = train(_cfg(tmp_path / "one", arch), progress=False)
    ck = load_checkpoint(out2)
    assert ck["step"] == STEPS + FINETUNE and ck["extra"]["world_size"] == 2
    rank1 = torch.load(out2 / "rank1.pt")
    ref = one.net.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        assert torch.equal(ck["model"][k], rank1[k]), f"{k}: ranks disagree"
    # the logged global-batch losses agree too
    import json

    def losses(p):
        return [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]

    l1, l2 = losses(tmp_path / "one"), losses(out2)
    assert len(l1) == len(l2) == STEPS + FINETUNE
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    assert not (out2 / "rank1").exists()
