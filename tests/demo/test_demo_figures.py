"""The demo's validation figures (moelpr.demo.figures), from made-up results: each draws, or gives None without data."""

from __future__ import annotations

from moelpr.demo.figures import SweepPoint, figure_gamma_tradeoff, figure_review_curve, figure_router_layers
from moelpr.evaluate.report import MethodResult

PNG = b"\x89PNG\r\n\x1a\n"
LANGUAGES = {"old": ["en", "es"], "new": ["hu"]}


def _method(name: str, routing: bool) -> MethodResult:
    route = {
        lang: {"layers": [0, 1, 2], "mean_prob": [[p, 1 - p] for p in (0.3 + d, 0.6 + d, 0.9 - d)]}
        for lang, d in (("en", 0.0), ("es", 0.05), ("hu", -0.2))
    }
    return MethodResult(
        name=name,
        ppl={"en": 20.0, "es": 25.0, "hu": 60.0},
        bpb={"en": 1.2, "es": 1.3, "hu": 2.1},
        languages=LANGUAGES,
        routing=route if routing else {},
    )


def test_router_layers_figure_draws_every_moe_method():
    assert figure_router_layers([_method("base", routing=False)]) is None  # no routing data: no figure
    methods = [_method("base", False), _method("moe_stage1", True), _method("moe_lpr", True)]
    data = figure_router_layers(methods, ceilings={"moe_lpr": [0.9, 0.95, 1.0]})
    assert data.startswith(PNG) and len(data) > 5000


def test_sweep_figures_need_two_points_and_the_base():
    points = [SweepPoint(g, f"γ={g:g}", 100 + 10 / (1 + g), 3.0 + 0.1 * g, default=g == 0.1) for g in (0, 0.1, 1)]
    refs = {"base": (100.0, 3.6), "full": (180.0, 2.9)}
    for draw in (figure_gamma_tradeoff, figure_review_curve):
        assert draw(points, refs).startswith(PNG)
        assert draw(points[:1], refs) is None
    assert figure_gamma_tradeoff(points, {"full": refs["full"]}) is None  # the change is against the base
