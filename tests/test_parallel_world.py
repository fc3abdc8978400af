"""parallel.init_world's host group on two gloo processes: under NCCL (here a gloo group that init_world is told is
NCCL) the host counts take a gloo group of their own, created with the run's timeout, destroyed with the World."""

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dist_util import free_port


def _worker(rank, port, owns, out):
    from fineviti.train import parallel
    from fineviti.train.config import preset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    if not owns:  # the caller's default group (init_world leaves it to its owner)
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    cfg = preset("debug").parallel
    cfg.timeout_s = 123
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
    try:
        world = parallel.init_world(cfg, "cpu")
    finally:
        dist.get_backend = real
    assert world.owns_group is owns and world.host_group is not dist.group.WORLD
    assert dist.get_backend(world.host_group) == "gloo"
    values = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(values, group=world.host_group)
    parallel.close_world(world)
    still = dist.is_initialized()
    if still:
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"sum": values.item(), "default_left": still}, out)


def test_the_host_group_is_gloo_and_goes_with_the_world(tmp_path):
    for owns in (True, False):
        out = tmp_path / f"owns{owns}.pt"
        mp.spawn(_worker, args=(free_port(), owns, str(out)), nprocs=2, join=True)
        result = torch.load(out)
        assert result["sum"] == 3.0
        assert result["default_left"] is (not owns)  # the caller's default group outlives the World's host group
