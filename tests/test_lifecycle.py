

def test_promotion_refuses_a_candidate_that_retires_soon():
    from finetune_mlflow.promotion import Decision
    from finetune_mlflow.promotion_lifecycle import lifecycle_gate

    config = load_config(None, {})
    soon = {"finetune.shutdown_date": (dt.date.today() + dt.timedelta(days=20)).isoformat(),
            "finetune.lifecycle_model": "gpt-4o-mini-2024-07-18"}
    later = {"finetune.shutdown_date": (dt.date.today() + dt.timedelta(days=31)).isoformat()}
    refused = lifecycle_gate(Decision(True, "F1 gain clears"), "2", soon, "1", {}, config)
    assert not refused.promote and refused.checks["lifecycle"] is False
    assert "gpt-4o-mini-2024-07-18 shuts down on" in refused.reason and "min_days_to_shutdown 30" in refused.reason
    kept = lifecycle_gate(Decision(True, "F1 gain clears"), "2", later, "1", soon, config)
    assert kept.promote and kept.reason == "F1 gain clears" and kept.checks["lifecycle"]
    both = lifecycle_gate(Decision(False, "F1 gain too small"), "2", soon, None, None, config)
    assert not both.promote and "F1 gain too small" in both.reason and "shuts down" in both.reason
    assert lifecycle_gate(Decision(True, "ok"), "2", {}, None, None, config).promote  # no date known: no gate
