"""The strategy's gradient message, streamed from backward's hooks (``GradientStream``): bucketing properties.

A real backward drives the post-accumulate-grad hooks; a recording reducer stands in for the engine. For
random parameter shapes, bucket sizes, unused parameters and dtypes, the message handed in equals the one
written after backward (``flat_gradient``) bit for bit, every announced range is written before it is
announced and never changes afterwards, and announced ranges are disjoint.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_codedreduce.strategy.gradients import GradientStream, TouchedParameters, flat_gradient, message_dtype


class RecordingReducer:
    """begin / filled / finish as ``CodedReducer``'s, checking the caller's side of the contract."""

    def __init__(self):
        self.flat = None
        self.ranges: list[tuple[int, int]] = []
        self.snapshots: list[torch.Tensor] = []

    def begin(self, step, flat, segments=None):
        flat.fill_(float("nan"))  # anything announced before it is written shows up
        self.flat, self.ranges, self.snapshots, self.segments = flat, [], [], segments

    def filled(self, step, lo, hi):
        assert 0 <= lo < hi <= self.flat.numel()
        assert not torch.isnan(self.flat[lo:hi]).any(), f"[{lo}, {hi}) announced before it was written"
        assert (lo, hi) in self.segments, f"[{lo}, {hi}) is not one of the segments given to begin: {self.segments}"
        self.ranges.append((lo, hi))
        self.snapshots.append(self.flat[lo:hi].clone())

    def finish(self, step):
        for (lo, hi), snap in zip(self.ranges, self.snapshots):
            assert torch.equal(self.flat[lo:hi], snap), f"[{lo}, {hi}) changed after it was announced"
        covered = sorted(self.ranges)
        for (_, a_hi), (b_lo, _) in zip(covered, covered[1:]):
            assert a_hi <= b_lo, f"announced ranges overlap: {covered}"
        return self.flat


shapes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, bucket_bytes=st.sampled_from([1, 64, 400, 4000, 25 << 20]),
       unused=st.sets(st.integers(0, 7)), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_streamed_message_is_the_message_written_after_backward(shapes, bucket_bytes, unused, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype)) for shape in shapes]
    used = [p for i, p in enumerate(params) if i not in unused] or params[:1]
    touched, stream, reducer = TouchedParameters(), GradientStream(bucket_bytes), RecordingReducer()
    touched.attach(params)
    touched.on_gradient = stream.on_gradient
    stream.start(reducer, 0, params, message_dtype(params))
    loss = sum((p.float() * torch.randn(p.shape, generator=g)).sum() for p in used)
    loss.backward()
    streamed = stream.finish(touched).clone()
    after = flat_gradient(params, touched, 1.0, torch.device("cpu"))
    assert streamed.dtype == after.dtype and torch.equal(streamed, after)
    # every bucket whose parameters all got a gradient was handed in during backward
    assert stream.early_buckets == len(reducer.ranges) and not stream.active
    if bucket_bytes == 1:  # one parameter per bucket: exactly the used ones
        assert stream.early_buckets == len(used)
    touched.detach()


def test_parameters_reached_only_by_an_earlier_backward_are_written_at_finish():
    # a piece back-propagated inside training_step reaches parameter a; the streamed (last) backward only b
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    touched, stream, reducer = TouchedParameters(), GradientStream(1), RecordingReducer()
    touched.attach([a, b])
    (2 * a).sum().backward()
    touched.on_gradient = stream.on_gradient
    stream.start(reducer, 0, [a, b], torch.float32)
    (3 * b).sum().backward()
    out = stream.finish(touched)
    assert out.tolist() == [2, 2, 2, 3, 3, 1, 1]  # gradients, then one "reached" flag per parameter
    assert reducer.ranges == [(3, 5)]  # only b's bucket went during backward
    touched.detach()


def test_first_bucket_is_small_as_ddps():
    params = [torch.nn.Parameter(torch.zeros(1 << 18)) for _ in range(4)]  # 1 MiB each in float32
    stream, reducer = GradientStream(25 << 20), RecordingReducer()
    stream.start(reducer, 0, params, torch.float32)
    for p in reversed(params):  # backward order
        p.grad = torch.ones_like(p)
        stream.on_gradient(p)
    # the last parameter alone (1 MiB), then the other three together (up to 25 MiB); the ring reduces in that order
    assert reducer.ranges == [(3 << 18, 4 << 18), (0, 3 << 18)] == reducer.segments
    stream.finish(TouchedParameters())

