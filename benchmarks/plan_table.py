"""Print a Markdown table of CodedReduce plan costs: redundancy, load imbalance, reduced-tolerance parents.

Usage: python benchmarks/plan_table.py
"""
from __future__ import annotations

from lightning_codedreduce.plan import CodedReducePlan


def rows() -> list[tuple[int, int, int]]:
    out = [(w, n, 1) for n in (3, 4) for w in range(1, 41)]
    out += [(13, 3, 1), (13, 12, 1)] + [(157, 12, s) for s in (1, 2, 3)]
    return out


def main() -> None:
    print("| W | n | s | depth | redundancy | imbalance | parents with reduced tolerance |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for w, n, s in rows():
        plan = CodedReducePlan(w, n, s)
        reduced = ", ".join(map(str, plan.reduced_tolerance)) or "-"
        print(f"| {w} | {n} | {s} | {plan.depth} | {plan.redundancy:.3f} | {plan.load_imbalance:.3f} | {reduced} |")


if __name__ == "__main__":
    main()
