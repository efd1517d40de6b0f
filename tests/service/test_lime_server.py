"""Lime and KernelShap through a real gRPC server and the Python client (params by Captum name, a seed), against Captum 0.9.0.

Tolerance 1e-5 (atol and rtol), as in tests/engine/test_lime_kernel_shap.py, whose docstring
says where KernelShap's float32 surrogate allows it; the cases here stay in that range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from attrserve_client import Attribution, AttributionClient
from oracle import MODELS, assert_informative, example_inputs
from servers import send_held

ATOL = RTOL = 1e-5


@dataclass
class ServerCase:
    model: str
    algorithm: str
    params: dict[str, Any] | None = None  # None: the server's defaults, which must be Captum's
    grouped: bool = False
    baselines: str = "none"  # none | scalar | row
    per_example_target: bool = False
    n: int = 2
    seed: int = 0
    build_args: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.algorithm}-{self.params}-grouped={self.grouped}-b={self.baselines}-s={self.seed}"

    def build(self) -> dict[str, Any]:
        inputs, args = example_inputs(self.model, self.n, seed=100 + self.seed)
        g = torch.Generator().manual_seed(200 + self.seed)
        baselines = {
            "none": (),
            "scalar": tuple(0.25 for _ in inputs),
            "row": tuple(0.1 * torch.randn((1, *x.shape[1:]), generator=g) for x in inputs),
        }[self.baselines]
        masks: tuple = ()
        if self.grouped:  # neighbouring pairs of scalars (per token for text), numbered across inputs
            offset, grouped = 0, []
            for x in inputs:
                shape = tuple(x.shape[1:])
                ids = torch.arange(shape[0])[:, None].expand(shape) if self.model == "text" else torch.arange(int(np.prod(shape))).reshape(shape) // 2
                grouped.append((ids + offset).reshape(1, *shape))
                offset += int(ids.max()) + 1
            masks = tuple(grouped)
        targets = [i % 2 for i in range(self.n)] if self.per_example_target else [1] * self.n
        return {"inputs": inputs, "args": args, "baselines": baselines, "masks": masks, "targets": targets}


CASES = [
    ServerCase("multi", "lime", None, seed=3),  # Captum's defaults: n_samples 25, alpha 0.01, kernel_width 1
    ServerCase("conv", "lime", {"n_samples": 60, "alpha": 0.001}, grouped=True, baselines="scalar"),
    ServerCase("text", "lime", {"n_samples": 50, "alpha": 0.002, "kernel_width": 0.75}, grouped=True, per_example_target=True, seed=4),
    ServerCase("mlp", "kernel_shap", None, n=3, seed=5),  # Captum's default n_samples 25
    ServerCase("multi", "kernel_shap", {"n_samples": 40}, grouped=True, baselines="row", per_example_target=True, seed=1),
    ServerCase("text", "kernel_shap", {"n_samples": 100, "perturbations_per_eval": 8}, seed=2),
]


def captum_attribute(case: ServerCase, built: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    import captum.attr as ca
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    params = case.params or {}
    model = MODELS[case.model]()  # NOTE: before seeding: the test models seed the global RNG as they build
    if case.algorithm == "lime" and params:
        method = ca.Lime(
            model,
            interpretable_model=SkLearnLasso(alpha=params.get("alpha", 0.01)),
            similarity_func=get_exp_kernel_similarity_function("cosine", params.get("kernel_width", 1.0)),
        )
    else:
        method = ca.Lime(model) if case.algorithm == "lime" else ca.KernelShap(model)
    kwargs: dict[str, Any] = {k: v for k, v in params.items() if k in ("n_samples", "perturbations_per_eval")}
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    if built["masks"]:
        kwargs["feature_mask"] = built["masks"]
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method.attribute(tuple(built["inputs"]), target=built["targets"] if case.per_example_target else 1, **kwargs)
    return tuple(o.detach() for o in out)


def arguments(case: ServerCase, built: dict[str, Any]) -> dict[str, Any]:
    return dict(
        baselines=tuple(b if isinstance(b, float) else b.numpy() for b in built["baselines"]) or None,
        target=built["targets"],
        additional_forward_args=tuple(a.numpy() for a in built["args"]) or None,
        feature_mask=tuple(m.numpy() for m in built["masks"]) or None,
        params=case.params,
        seed=case.seed,
    )


def call(client: AttributionClient, case: ServerCase, built: dict[str, Any]):
    return client.attribute(case.model, case.algorithm, tuple(x.numpy() for x in built["inputs"]), timeout=60, **arguments(case, built))


def request_for(case: ServerCase, built: dict[str, Any]):
    return AttributionClient.build_request(case.model, case.algorithm, tuple(x.numpy() for x in built["inputs"]), **arguments(case, built))


def check(result, case: ServerCase, built: dict[str, Any]) -> None:
    want = captum_attribute(case, built)
    assert len(result.attributions) == len(want)
    assert_informative(want, ATOL)
    for got, w in zip(result.attributions, want):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, w.numpy(), atol=ATOL, rtol=RTOL)
    assert result.seed == case.seed
    n_samples = (case.params or {}).get("n_samples", 25)
    assert result.timing["rows"] == case.n * n_samples


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_server_matches_captum(server, case: ServerCase) -> None:
    built = case.build()
    with AttributionClient(server.address) as client:
        result = call(client, case, built)
    check(result, case, built)


def test_concurrent_requests_fuse_and_stay_correct(fusing_server) -> None:
    """Every case queued together (held). Each is one group of forward rows (n × n_samples) under its model's batch
    key, so each model's rows are cut in exactly one pass, shared by that model's requests; each equals Captum."""
    built = [c.build() for c in CASES]
    rows = [c.n * (c.params or {}).get("n_samples", 25) for c in CASES]
    rows_of_model = {m: sum(r for c, r in zip(CASES, rows) if c.model == m) for m in {c.model for c in CASES}}
    requests_of_model = {m: sum(c.model == m for c in CASES) for m in rows_of_model}
    assert rows_of_model == {"multi": 130, "conv": 120, "text": 300, "mlp": 75}
    engine = fusing_server.running.engine
    passes, engine_rows = engine.passes, engine.rows
    with AttributionClient(fusing_server.address) as client:
        calls = send_held(fusing_server, client, [request_for(c, b) for c, b in zip(CASES, built)])
        results = [Attribution.from_response(call.result(timeout=60), single=False) for call in calls]
    for result, case, b in zip(results, CASES, built):
        check(result, case, b)
    assert (engine.passes - passes, engine.rows - engine_rows) == (4, 625)
    for result, case, r in zip(results, CASES, rows):
        assert {k: result.timing[k] for k in ("rows", "passes", "pass_rows", "pass_requests")} == {
            "rows": r, "passes": 1, "pass_rows": rows_of_model[case.model], "pass_requests": requests_of_model[case.model]}, case.id


@pytest.mark.parametrize(
    "algorithm, params, mask, message",
    [
        ("kernel_shap", None, np.zeros((1, 6), dtype=np.int64), "at least 2 interpretable features"),
        ("lime", {"kernel_width": 0.0}, None, "kernel_width"),
    ],
)
def test_bad_requests_are_invalid_argument(server, algorithm: str, params, mask, message: str) -> None:
    x = np.random.RandomState(0).randn(1, 6).astype(np.float32)
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
        client.attribute("mlp", algorithm, x, target=0, params=params, feature_mask=mask, seed=0, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
