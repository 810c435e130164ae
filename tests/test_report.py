"""The comparison report: the winner rule, the markdown and HTML it writes, and collecting runs from MLflow."""

from __future__ import annotations

import base64
import re

import pytest

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.report import Curve, RunRecord, build_report, pick_winner, rank_runs
from finetune_mlflow.report.figures import moving_average
from finetune_mlflow.report.ranking import margin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(run_id: str, f1: float | None, *, name: str | None = None, provider: str = "openai", epochs: float = 3,
        latency: float | None = 400.0, cost: float | None = None, curves: bool = True, **metrics: float
        ) -> RunRecord:
    """A tune run as collect would build it: F1 with its interval, base scores, the paired gain, loss curves."""
    values = dict(metrics)
    if f1 is not None:
        values.update(eval_f1=f1, eval_f1_ci_low=f1 - 2, eval_f1_ci_high=f1 + 2, eval_exact_match=f1 - 10,
                      eval_exact_match_ci_low=f1 - 12, eval_exact_match_ci_high=f1 - 8, base_eval_f1=50.0,
                      base_eval_exact_match=40.0, eval_f1_delta=f1 - 50, eval_f1_delta_ci_low=f1 - 52,
                      eval_f1_delta_ci_high=f1 - 48, base_latency_ms_p95=380.0)
    if latency is not None:
        values["latency_ms_p95"] = latency
    if cost is not None:
        values["estimated_cost_usd"] = cost
    history = {"train_loss": Curve(tuple(range(1, 81)), tuple(3.0 - i / 40 for i in range(80))),
               "val_loss": Curve((20, 40, 60, 80), (2.5, 2.1, 1.9, 1.8))} if curves else {}
    return RunRecord(run_id=run_id, run_name=name or f"tune {provider} e{epochs:g}", provider=provider,
                     base_model="gpt-4o-mini", epochs=epochs, learning_rate=1.8, batch_size=8, metrics=values,
                     curves=history)


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_highest_f1_wins_whatever_the_order():
    runs = [run("a", 60.0), run("b", 64.5), run("c", 62.0)]
    assert [r.run_id for r in rank_runs(runs)] == ["b", "c", "a"]
    assert pick_winner(list(reversed(runs))).run_id == "b"


def test_an_f1_tie_goes_to_lower_latency_then_to_lower_cost():
    slow, fast = run("slow", 61.0, latency=900.0, cost=1.0), run("fast", 61.0, latency=300.0, cost=9.0)
    assert pick_winner([slow, fast]).run_id == "fast"
    assert margin(fast, slow).decided_by == "latency"
    pricey, cheap = run("pricey", 61.0, latency=300.0, cost=9.0), run("cheap", 61.0, latency=300.0, cost=2.0)
    assert pick_winner([pricey, cheap]).run_id == "cheap"
    assert margin(cheap, pricey).decided_by == "cost"


def test_missing_numbers_lose_their_comparison_and_a_run_without_f1_never_wins():
    assert pick_winner([run("unmeasured", 61.0, latency=None), run("measured", 61.0)]).run_id == "measured"
    free = run("free", 61.0, provider="local")
    assert pick_winner([run("unknown", 61.0), free]).run_id == "free"  # unknown cost loses to "no cost"
    assert pick_winner([run("none", None), run("some", 1.0)]).run_id == "some"
    assert pick_winner([run("none", None)]) is None


def test_markdown_names_the_winner_its_margin_and_every_interval():
    report = build_report([run("r1", 60.0, name="tune e1"), run("r3", 65.0, name="tune e3")],
                          skipped={"FAILED": 2}, source="experiment squad-openai")
    text = report.markdown
    assert text.startswith("# Fine-tuning comparison: 2 run(s) from experiment squad-openai")
    assert "Winner: tune e3 (run r3, openai/gpt-4o-mini) with F1 65.00 [63.00, 67.00]" in text
    assert "+15.00 F1 over its base model gpt-4o-mini (95% CI +13.00 to +17.00)." in text
    assert "beats the runner-up tune e1 (F1 60.00) by 5.00 F1 points; their 95% intervals do not overlap" in text
    assert "Skipped 2 run(s): 2 FAILED." in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0].startswith("| 1 | tune e3 |") and rows[1].startswith("| 2 | tune e1 |")
    assert "| tune e1 | gpt-4o-mini | 40.00 | 50.00 [48.00, 52.00] |" in text  # base EM has no logged interval


def test_close_runs_are_called_possible_noise_and_a_gain_spanning_zero_is_not_a_gain():
    text = build_report([run("a", 50.5), run("b", 50.0, name="other")]).markdown
    assert "their 95% intervals overlap, so the margin may be noise" in text
    assert "(95% CI -1.50 to +2.50): not distinguishable from the base model." in text


def test_html_is_one_page_with_every_figure_embedded_and_every_run_named():
    runs = [run("a", 60.0, name="tune e1", epochs=1, cost=1.0), run("b", 64.0, name="tune e3", cost=3.0),
            run("c", 52.0, name="tune gemini", provider="vertex", cost=4.0)]
    page = build_report(runs).html
    pngs = images(page)
    assert len(pngs) == 4 and all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert "<script" not in page and "http" not in page  # self-contained: nothing to fetch
    for name in ("tune e1", "tune e3", "tune gemini"):
        assert name in page
    assert "$0.10" in page and "$0.21" in page and "$2.00" in page  # USD per F1 point: 1/10, 3/14, 4/2


def test_free_runs_say_no_cost_instead_of_plotting_zeros():
    runs = [run("a", 60.0, provider="local", cost=0.0), run("b", 62.0, provider="local")]
    report = build_report(runs)
    assert len(images(report.html)) == 3  # no cost figure
    assert "Not drawn, no cost (free provider): " in report.markdown
    assert "| no cost | no cost |" in report.markdown


def test_runs_without_cost_curves_latency_or_intervals_still_report():
    bare = RunRecord("bare", "imported job", "openai", "gpt-4o-mini", metrics={"eval_f1": 55.0})
    report = build_report([bare, run("x", 58.0, curves=False, latency=None)])
    assert "No run logged a loss history." in report.markdown
    assert "No run has a known cost and an F1 gain over base. Not drawn, cost unknown: " in report.markdown
    assert "| imported job | openai | gpt-4o-mini | — | — | — | 55.00 | — | — | — | unknown | — |" in report.markdown
    assert len(images(report.html)) == 1  # only F1 by epochs: nobody has curves, latency or a cost


def test_repeated_run_names_get_their_run_id_and_pipes_do_not_break_tables():
    report = build_report([run("aaaaaaaa1", 60.0, name="tune-local"), run("bbbbbbbb2", 61.0, name="tune-local"),
                           run("c", 59.0, name="a|b")])
    assert "tune-local (aaaaaaaa)" in report.markdown and "tune-local (bbbbbbbb)" in report.html
    assert "| a\\|b |" in report.markdown


def test_no_runs_is_an_error_that_says_what_was_skipped():
    with pytest.raises(FinetuneError, match="no finished tune run .* Skipped 1 run"):
        build_report([], skipped={"RUNNING": 1})


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
