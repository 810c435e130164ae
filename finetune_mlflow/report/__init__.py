"""The comparison report: which tuning setting won, by how much, and what it costs.

`runs` (plain records), `ranking` (the winner rule, shared with the sweep), `tables`, `figures` and `render` are
pure; `collect` reads records out of MLflow and `publish` writes the report to disk or to a parent run.
"""

from finetune_mlflow.report.collect import Collected, from_experiment, from_parent, from_run_ids
from finetune_mlflow.report.publish import log_children_report, log_report, write_report
from finetune_mlflow.report.ranking import pick_winner, rank_runs, winner_key
from finetune_mlflow.report.render import Report, build_report
from finetune_mlflow.report.runs import Curve, RunRecord

__all__ = ["Collected", "Curve", "Report", "RunRecord", "build_report", "from_experiment", "from_parent",
           "from_run_ids", "log_children_report", "log_report", "pick_winner", "rank_runs", "winner_key",
           "write_report"]
