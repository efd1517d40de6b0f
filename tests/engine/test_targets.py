"""targets.flat_target: the numpy path (every CPU target) and the torch path (targets on another device) build the
same flat index and refuse the same targets with the same message; check_target refuses exactly what they refuse."""

from __future__ import annotations

import math
import re

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from attrserve_engine import AttributionJob, Engine, EngineLimits, InputSpec, ModelSpec
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.targets import _flat_torch, check_target, flat_target, format_target, fused_flat_target, index_width

SHAPES = [(10,), (3, 4), (2, 3, 5), (4, 1), (6, 2, 1)]


def _reference(target: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """The flat index, one row at a time in plain Python (negative indices count from the end)."""
    k = target.shape[1]
    flats = []
    for row in target.tolist():
        flat = 0
        for j, i in enumerate(row):
            flat = flat * out_shape[j] + (i % out_shape[j])
        flats.append(flat * math.prod(out_shape[k:]))
    return torch.tensor(flats, dtype=torch.int64)


def _targets(out_shape: tuple[int, ...], rows: int, seed: int) -> list[torch.Tensor]:
    """In-range targets of every width the shape admits (an index for each dim up to the last one that is not 1)."""
    g = torch.Generator().manual_seed(seed)
    need = max((j + 1 for j, size in enumerate(out_shape) if size != 1), default=0)
    out = []
    for k in range(need, len(out_shape) + 1):
        sizes = torch.tensor(out_shape[:k], dtype=torch.int64)
        out.append(torch.randint(-(1 << 20), 1 << 20, (rows, k), generator=g) % (2 * sizes) - sizes)
    return out


@pytest.mark.parametrize("out_shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 400])
def test_numpy_and_torch_paths_build_the_same_flat_index(out_shape: tuple[int, ...], rows: int) -> None:
    for target in _targets(out_shape, rows, seed=rows):
        flat = flat_target(target, out_shape)
        assert flat.dtype == torch.int64 and flat.shape == (rows,) and flat.is_contiguous()
        assert torch.equal(flat, _reference(target, out_shape))
        assert torch.equal(_flat_torch(target, out_shape, target.shape[1], "target"), flat)
        check_target(target, out_shape)  # in range: no error


def test_a_target_of_no_indices_selects_the_one_value() -> None:
    target = torch.zeros((3, 0), dtype=torch.int64)
    assert torch.equal(flat_target(target, ()), torch.zeros(3, dtype=torch.int64))
    assert torch.equal(flat_target(target, (1, 1)), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(
    ("rows", "out_shape", "message"),
    [
        ([[0], [10]], (10,), "target index 10 is out of range for output dim 1 of size 10"),
        ([[0], [-11]], (10,), "target index -11 is out of range for output dim 1 of size 10"),
        ([[1, 1], [2, 4], [5, 9]], (3, 4), "target index 4 is out of range for output dim 2 of size 4"),
        ([[3, 0], [0, 9]], (3, 4), "target index 3 is out of range for output dim 1 of size 3"),  # the first, row-major
    ],
)
def test_both_paths_and_check_target_refuse_an_out_of_range_index_alike(rows: list, out_shape: tuple, message: str) -> None:
    target = torch.tensor(rows, dtype=torch.int64)
    errors = []
    for refuse in (
        lambda: flat_target(target, out_shape),
        lambda: _flat_torch(target, out_shape, target.shape[1], "target"),
        lambda: check_target(target, out_shape),
    ):
        with pytest.raises(InvalidArgument) as e:
            refuse()
        errors.append(str(e.value))
    assert errors == [message] * 3


def test_the_message_names_what_is_indexed() -> None:
    with pytest.raises(InvalidArgument, match="^neuron_selector index 7 is out of range"):
        flat_target(torch.tensor([[7]]), (4,), "neuron_selector")


def test_a_width_the_output_does_not_take_is_refused_before_any_index_is_read() -> None:
    with pytest.raises(InvalidArgument, match=r"target has 2 indices but the explained output per example has shape \(10,\)"):
        index_width(torch.zeros((1, 2), dtype=torch.int64), (10,))
    with pytest.raises(InvalidArgument, match=r"needs 2 index\(es\), got 1"):
        check_target(torch.zeros((1, 1), dtype=torch.int64), (3, 4))


def test_a_fused_pass_refuses_only_the_segments_with_bad_targets() -> None:
    good, bad = torch.tensor([[1], [-1]]), torch.tensor([[2], [12]])
    failures: list = [None, None, None]
    flat = fused_flat_target([good, bad, good], (10,), failures)
    assert failures[0] is None and failures[2] is None
    assert isinstance(failures[1], InvalidArgument) and "index 12" in str(failures[1])
    assert flat.tolist() == [1, 9, 0, 0, 1, 9]  # the refused segment's rows select index 0


class _PerToken(nn.Module):
    """(n, L, 4) -> (n, L, 3): a classifier of each token, whatever the sequence's length L."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("pinned", [False, True])
def test_a_target_is_judged_by_its_own_requests_output_where_the_config_pins_no_shape(pinned: bool) -> None:
    """The engine checks a target before queueing it against the output shape its warm-up learned, which holds for
    every request only where the config pins every input dim. Elsewhere the output's shape is each request's own: the
    model's first pass (a prediction on one token here) was kept as the model's shape, and later requests' valid
    targets (token 1 of 2, token 5 of 6) were refused as out of range until the model was reloaded. Found by an audit
    in issue 12 step 46."""
    torch.manual_seed(0)
    module = _PerToken().eval()
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    dims = (6, 4) if pinned else (-1, 4)
    try:
        engine.load(ModelSpec(name="tokens", module=module, inputs=[InputSpec("x", torch.float32, dims)]))
        g = torch.Generator().manual_seed(1)
        short, long = torch.randn(1, 2, 4, generator=g), torch.randn(1, 6, 4, generator=g)
        if not pinned:
            predicted = engine.submit(AttributionJob(model="tokens", algorithm="", inputs=(torch.randn(2, 1, 4),), return_outputs=True))
            assert predicted.result(30).outputs.shape == (2, 1, 3)
            first = engine.submit(AttributionJob(model="tokens", algorithm="saliency", inputs=(short,), target=[(1, 2)])).result(30)
            want = Saliency(module).attribute(short.clone().requires_grad_(), target=(1, 2))
            torch.testing.assert_close(first.attributions[0], want, rtol=0, atol=1e-6)
        result = engine.submit(AttributionJob(model="tokens", algorithm="saliency", inputs=(long,), target=[(5, 0)])).result(30)
        want = Saliency(module).attribute(long.clone().requires_grad_(), target=(5, 0))
        torch.testing.assert_close(result.attributions[0], want, rtol=0, atol=1e-6)
        # An index past this request's own output is still refused, naming the target: before queueing where the shape
        # is pinned, by the pass otherwise.
        with pytest.raises(InvalidArgument, match="target index 6 is out of range for output dim 1 of size 6"):
            engine.submit(AttributionJob(model="tokens", algorithm="saliency", inputs=(long,), target=[(6, 0)])).result(30)
        if not pinned:
            with pytest.raises(InvalidArgument, match="target index 5 is out of range for output dim 1 of size 2"):
                engine.submit(AttributionJob(model="tokens", algorithm="saliency", inputs=(short,), target=[(5, 0)])).result(30)
    finally:
        engine.shutdown(drain=False, timeout=5)


@pytest.mark.parametrize(
    ("target", "field"),
    [
        (2**63, "target index 9223372036854775808"),
        (-(2**63) - 1, "target index -9223372036854775809"),
        (10**25, "target index 10000000000000000000000000"),
        ((0, 2**64 - 1), "target.tuple index 18446744073709551615"),
        ([0, 10**25, 1], "target.per_example[1] index 10000000000000000000000000"),
        ([(0, 1), (1, 0), (2**63, 0)], "target.per_example[2] index 9223372036854775808"),
    ],
)
def test_format_target_refuses_an_index_past_int64_naming_it(target, field: str) -> None:
    """numpy's OverflowError building the int64 target was an INTERNAL error; the bounds themselves are accepted."""
    with pytest.raises(InvalidArgument, match=re.escape(field) + " is out of range: an index must fit in an int64"):
        format_target(target, 3)
    assert format_target(2**63 - 1, 2).tolist() == [[2**63 - 1]] * 2
    assert format_target((-(2**63), 0), 1).tolist() == [[-(2**63), 0]]
