"""`make demo`: show the CodedReduce plan for an example cluster (13 ranks, branching 3, 1 straggler)."""
from lightning_codedreduce.plan import CodedReducePlan

if __name__ == "__main__":
    plan = CodedReducePlan(world_size=13, branching=3, stragglers=1)
    print(plan.describe())
    batch = plan.global_batch_for(32)
    print(f"\nwith 32 samples per rank the global batch is {batch}; rank 4 computes {plan.shards(4, batch)}")
