"""What a finished run reports: its test metrics, named as the bundle, ``summary.json`` and the
summary tables read them."""

from __future__ import annotations


def final_metrics(test_results: dict, uses_trigger: bool) -> dict:
    clean = float(test_results.get("test/acc_clean", float("nan")))
    metrics = {"test_acc_clean": clean}
    if uses_trigger:
        metrics["test_acc_trigger"] = float(test_results.get("test/acc_trigger", float("nan")))
        metrics["test_guess_acc_clean"] = float(test_results.get("test/guess_acc_clean", float("nan")))
    # The deployed unit's accuracy: with the trigger for a trigger-activation model.
    metrics["test_acc_deployed"] = metrics.get("test_acc_trigger", clean)
    return metrics
