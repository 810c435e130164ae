"""promote through its command line: the first promotion meets the same gates as any other, two promotes at once
end with one winner and one that says it lost, a version whose files are gone never takes the alias, and every
decision is written on the version itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main as cli_main
from finetune_mlflow.config import PromotionConfig
from finetune_mlflow.ownership import HEARTBEAT_TAG, OWNER_TAG, me
from finetune_mlflow.promotion import Evidence, decide
from finetune_mlflow.promotion_lock import RUN_TAG, lock_name
from finetune_mlflow.steps.tune import run_tune
from tests.conftest import ROOT
from tests.e2e_support import wait_for
from tests.test_e2e_local import small_config

NAME = "squad-qa-local"


@pytest.mark.parametrize(("evidence", "gates", "promote", "reason"), [
    # The case: +4.1 over base (95% CI -2.2 to +10.1) with min_f1_gain 50 is not a champion.
    (Evidence(34.0, 0.0, 5.0, "base model", 29.9, 4.1, -2.2, 10.1), PromotionConfig(min_f1_gain=50), False,
     "does not clear min_f1_gain +50.00"),
    # A clear gain whose lower bound is still under zero: not promoted against base either.
    (Evidence(34.0, 0.0, 5.0, "base model", 29.9, 4.1, -0.1, 8.0), PromotionConfig(), False, "at the lower bound"),
    # A negative min_f1_gain never lets a model worse than base through.
    (Evidence(29.0, 0.0, 5.0, "base model", 29.9, -0.9, -3.0, 1.0), PromotionConfig(min_f1_gain=-10), False,
     "not above the base model"),
    (Evidence(52.0, 0.0, 5.0, "base model", 29.9, 22.1, 18.0, 26.0), PromotionConfig(min_f1_gain=5), True,
     "clears min_f1_gain +5.00"),
    # Latency is said rounded, and an unknown latency fails a set gate.
    (Evidence(52.0, 0.0, 12.39386125018882, "base model", 29.9, 22.1, 18.0, 26.0),
     PromotionConfig(max_latency_ms_p95=10), False, "latency p95 12 ms is over max_latency_ms_p95 10 ms"),
    (Evidence(52.0, 0.0, None, "champion v1", 29.9, 22.1, 18.0, 26.0),
     PromotionConfig(max_latency_ms_p95=10), False, "latency p95 unknown ms"),
])
def test_the_same_gates_hold_against_the_base_model_and_a_champion(evidence, gates, promote, reason):
    decision = decide(evidence, gates)
    assert decision.promote is promote and reason in decision.reason


def _promote(version: str, *extra: str) -> subprocess.Popen:
    """`python -m finetune_mlflow promote` (the MLproject's command) for one version, its output on a pipe."""
    return subprocess.Popen([sys.executable, "-m", "finetune_mlflow", "promote", "--config",
                             str(ROOT / "experiments" / "squad_local.yaml"), "--version", version, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class _Output:
    """A process's output lines as they come, so a test waits on what the process says, not on a clock."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self._thread = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self._thread.start()

    def says(self, text: str) -> bool:
        if self.process.poll() is not None and not any(text in line for line in self.lines):
            self._thread.join(5)
        return any(text in line for line in self.lines)

    def finish(self) -> tuple[int, str]:
        code = self.process.wait(timeout=600)
        self._thread.join(30)
        return code, "".join(self.lines)


def _cli_promote(capsys, version: str, *extra: str) -> tuple[int, str]:
    """The same command in this process (no interpreter start-up), for the steps that race nobody."""
    code = cli_main(["promote", "--config", str(ROOT / "experiments" / "squad_local.yaml"), "--version", version,
                     *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _alias(alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(NAME, alias).version)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def _copy_of(version: str) -> str:
    """Another version of the same run's model (a second candidate with the same evidence, no second training)."""
    client = MlflowClient()
    first = client.get_model_version(NAME, version)
    return str(client.create_model_version(NAME, first.source, run_id=first.run_id, model_id=first.model_id).version)


def test_first_promotion_gates_then_two_concurrent_promotes_one_wins_one_says_it_lost(small_squad, capsys):
    run_tune(small_config(small_squad, epochs="1"))
    client = MlflowClient()

    # No champion: min_f1_gain still applies against the base model.
    code, out = _cli_promote(capsys, "1", "--set", "promotion.min_f1_gain=50")
    assert code == 0 and "not promoted to champion" in out and "does not clear min_f1_gain +50.00" in out, out
    assert _alias("champion") is None and _alias("challenger") == "1"
    rejected = client.get_model_version(NAME, "1")
    assert rejected.tags["promotion.decision"] == "rejected" and rejected.tags["promotion.reference"] == "base model"
    assert "**not promoted to champion**" in rejected.description
    assert "tuning job" in rejected.description  # what tune wrote is kept

    # Test-sized data gives a gain of about +1 (interval about -4 to +7): a gate set below that lower bound.
    code, out = _cli_promote(capsys, "1", "--set", "promotion.min_f1_gain=-10")
    assert code == 0 and "v1: promoted to champion" in out, out
    promoted = client.get_model_version(NAME, "1")
    tags = promoted.tags
    assert tags["promotion.decision"] == "promoted" and float(tags["promotion.f1_gain"]) > 0
    low, _, high = tags["promotion.f1_gain_ci95"].partition(" to ")
    assert -10 < float(low) <= float(tags["promotion.f1_gain"]) <= float(high)
    assert tags["promotion.gates"] == "F1 gain lower bound > -10, error rate <= 5%, p95 latency <= off"
    run = client.get_run(tags["promotion.run_id"])
    assert run.data.tags["finetune.step"] == "promote" and run.info.status == "FINISHED"
    # One promotion section, rewritten (not appended) by the later decision, with a link to its run.
    assert promoted.description.count("**Promotion**") == 1 and "**promoted to champion**" in promoted.description
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in promoted.description
    assert _alias("challenger") is None  # the promoted challenger gives the alias up

    # Two candidates that both clear the gates against champion v1, started together; a third party holds the
    # promotion lock until both have decided and are waiting, so their alias moves truly contend.
    second, third = _copy_of("1"), _copy_of("1")
    client.create_registered_model(lock_name(NAME), tags={OWNER_TAG: me(), HEARTBEAT_TAG: "0", RUN_TAG: "test"})
    racers = [_Output(_promote(v, "--set", "promotion.min_f1_gain=-100")) for v in (second, third)]
    wait_for(lambda: all(r.says("waiting for the promotion held by") or r.process.poll() is not None
                         for r in racers), timeout=300, what="both promotes waiting on the lock")
    client.delete_registered_model(lock_name(NAME))
    results = [r.finish() for r in racers]
    winners = [(v, out) for v, (code, out) in zip((second, third), results) if code == 0]
    losers = [(v, code, out) for v, (code, out) in zip((second, third), results) if code != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    (winner, _), (loser, code, out) = winners[0], losers[0]
    assert code == 2 and "error: lost the race" in out and f"changed to version {winner}" in out, out
    assert _alias("champion") == winner and _alias("previous_champion") == "1"
    lost_run = client.search_runs(["0"], f"tags.`promotion.candidate` = '{loser}'")[0]
    assert lost_run.info.status == "FAILED" and "lost the race" in lost_run.data.tags["finetune.end_reason"]
    assert "promotion.decision" not in client.get_model_version(NAME, loser).tags  # nothing written for the loser
    assert [m.name for m in client.search_registered_models()] == [NAME]  # the lock is gone


def test_a_version_whose_files_are_gone_is_not_promoted_and_challenger_stays_with_the_newest(small_squad, capsys):
    run_tune(small_config(small_squad, epochs="1"))
    client = MlflowClient()
    second, third = _copy_of("1"), _copy_of("1")
    for version in (third, second):  # the newest is rejected first, then an older one is looked at again
        code, out = _cli_promote(capsys, version, "--set", "promotion.min_f1_gain=60")
        assert code == 0 and "not promoted" in out, out
    assert _alias("challenger") == third
    assert client.get_model_version(NAME, second).tags["promotion.decision"] == "rejected"

    # The model's files deleted from the artifact store: the gates pass, the load check refuses.
    model = client.get_logged_model(client.get_model_version(NAME, "1").source.rsplit("/", 1)[-1])  # models:/<id>
    shutil.rmtree(Path(urlparse(model.artifact_location).path))
    code, out = _cli_promote(capsys, "1", "--set", "promotion.min_f1_gain=-10")
    assert code == 2 and "models:/squad-qa-local/1 does not load" in out and "no alias was moved" in out, out
    assert _alias("champion") is None and _alias("challenger") == third
    failed = client.search_runs(["0"], "tags.`promotion.candidate` = '1'")[0]
    assert failed.info.status == "FAILED" and "does not load" in failed.data.tags["finetune.end_reason"]
