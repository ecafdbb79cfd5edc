"""Two ranks: rank 1 plays a faulty peer, hand-crafting frames; rank 0's CodedReducer must reject each."""
import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

from lightning_codedreduce.engine import CodedReduceError, CodedReducer
from lightning_codedreduce.engine.collectives import pack
from lightning_codedreduce.engine.frames import MAGIC, Header, Kind, fingerprint_int
from lightning_codedreduce.engine.transport import TAG, link_groups
from lightning_codedreduce.plan import CodedReducePlan


def crafted(case: str, fp: int) -> list[torch.Tensor]:
    up = Header(Kind.UP, 0, 4, torch.float32, 1)
    if case == "fingerprint":
        return [up.encode(fp ^ 0x5A5A)]  # a rejected header: its payload is never read
    if case == "step":
        return [Header(Kind.UP, 7, 4, torch.float32, 1).encode(fp), torch.ones(4)]
    if case == "length":
        return [Header(Kind.UP, 0, 5, torch.float32, 1).encode(fp), torch.ones(5)]
    if case == "announce":  # only a parent announces (rank 0's decisions travel down)
        payload = pack({"switch": True})
        return [Header(Kind.ANNOUNCE, 3, payload.numel(), torch.uint8, 1).encode(fp), payload]
    if case == "magic":
        raw = up.encode(fp)
        raw[0] = MAGIC + 1
        return [raw]
    raise ValueError(case)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out_dir = p.parse_args().out
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    results = {}
    # 1. ranks that built different plans refuse to start
    other = CodedReducePlan(2, 2, 1) if rank == 0 else CodedReducePlan(2, 3, 0)
    try:
        CodedReducer(other, timeout=5)
        results["plans"] = "accepted"
    except CodedReduceError as err:
        results["plans"] = str(err)
    # 2. single bad frames from a faulty peer. The cases are sequenced through files, not collectives:
    # rank 1 never answers rank 0's heartbeats, so the link's gloo pair must carry nothing else.
    plan = CodedReducePlan(2, 2, 1)
    fp = fingerprint_int(plan.fingerprint())
    for number, case in enumerate(("fingerprint", "step", "length", "magic", "announce")):
        tag = TAG + 1 + number  # a failed reducer's receive stays posted: each case gets its own tag
        done = os.path.join(out_dir, f"{case}.done")
        if rank == 1:  # the link's own process group, created as rank 0's reducer creates it
            send_group, _, _ = link_groups(plan, 1, None, 60)[0]
            works = [dist.isend(t, 0, group=send_group, tag=tag) for t in crafted(case, fp)]  # alive until rank 0 is done
            while not os.path.exists(done):
                time.sleep(0.05)
            del works
            continue
        reducer = CodedReducer(plan, timeout=60, check_plan=False, tag=tag)  # abandoned, not closed: see above
        try:
            reducer.reduce(0, torch.ones(4))
            results[case] = "accepted"
        except CodedReduceError as err:
            results[case] = str(err)
        open(done, "w").close()
    if rank == 0:
        with open(os.path.join(out_dir, "frames.json"), "w") as f:
            json.dump(results, f, indent=1)
    os._exit(0)


if __name__ == "__main__":
    main()
