"""The retraining policy as a Prefect block: where a model's labelled data lives and when a new
version may replace the champion.

Resolution for a model (``resolve_retraining_policy``): the saved document the caller names, else
the document named after the model's slug (``customer_churn`` -> ``customer-churn``), else the one
named ``default``, else the built-in defaults (which know no labelled data). Only a missing
document moves on to the next; a saved one that does not validate is a ConfigurationError. The drift threshold is
the MonitoringPolicy's; the schedule's cron and timezone live in prefect.yaml only.
"""
from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from blocks.documents import load_saved
from tasks.errors import ConfigurationError

DEFAULT_DOCUMENT = "default"


class RetrainingPolicy(Block):
    """When mlops-flows retrains a model, on what data, and what a challenger must prove."""

    _block_type_name = "Retraining Policy"
    _block_type_slug = "mlops-retraining-policy"
    _description = ("Labelled data, retraining triggers (production metric, model age, new rows, "
                    "cooldown) and the champion/challenger gate used by retraining_check and "
                    "retrain_model. Save one per model under the model's slug, or 'default'.")

    training_data: str | None = Field(
        default=None,
        description="The model's labelled data: a csv/parquet path, a folder (every csv/parquet "
                    "file in it, in name order), an s3://bucket/key or s3://bucket/prefix/ (read "
                    "through the saved S3Bucket block for that bucket).")
    target: str | None = Field(default=None, description="The label column of training_data.")
    min_production_metric: float | None = Field(
        default=None,
        description="Floor of the model's primary metric (roc_auc, balanced_accuracy, rmse, ...) "
                    "on labelled rows it never saw, in the metric's better direction (for a "
                    "lower-is-better metric such as rmse it is a ceiling). Below it: retrain, and "
                    "no challenger below it is promoted. Empty: the champion's holdout value "
                    "worsened by the MonitoringPolicy's max_relative_degradation.")
    max_model_age_days: float | None = Field(
        default=30.0, gt=0, description="Retrain a champion older than this (empty: never).")
    min_new_rows: int = Field(
        default=200, ge=1,
        description="Labelled rows the champion has not seen that a retraining needs.")
    promotion_margin: float = Field(
        default=0.0, ge=0.0,
        description="How much better (absolute, in the primary metric's better direction) the "
                    "challenger must score than the champion on the gate rows; an equal score "
                    "never promotes.")
    gate_share: float = Field(
        default=0.5, gt=0.0, lt=1.0,
        description="Share of the new rows held out as the gate slice (champion and challenger "
                    "are both scored on it; the challenger trains on everything else).")
    cooldown_hours: float = Field(
        default=24.0, ge=0.0,
        description="Hours after a retraining during which scheduled and event-triggered checks "
                    "do not retrain again (manual retrain_model calls are not held).")
    require_approval: bool = Field(
        default=False,
        description="Pause before promoting a challenger that passed the gate until a person "
                    "approves in the Prefect UI (or resume_flow_run with run_input).")
    approval_timeout_hours: float = Field(
        default=24.0, gt=0, description="Not approved within this: not promoted.")
    time_budget_s: float = Field(
        default=60.0, gt=0, description="Training time budget of the challenger's search.")
    max_trials: int | None = Field(
        default=None, gt=0,
        description="Stop the challenger's search after this many trials, whatever time they "
                    "take (reproducible); empty: time_budget_s decides.")
    slot_lease_s: float = Field(
        default=600.0, ge=60, le=86400,
        description="A retraining holds the model's one slot with a lease its run renews while "
                    "alive; a run that died (killed worker, lost machine) frees the slot after "
                    "this many seconds (Prefect's minimum: 60).")
    monitoring_policy: str | None = Field(
        default=None,
        description="Name of the MonitoringPolicy document whose drift threshold, degradation "
                    "share and alert channels apply (empty: 'default', else built-in).")

    @field_validator("target")
    @classmethod
    def _target_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("target must name a column, not be blank")
        return value

    def labelled_data_problem(self, model_name: str, document: str | None = None) -> str | None:
        """None when training_data and target are both set, else what is missing and how to
        configure it (in `document`, default: the model's own document)."""
        if self.training_data and self.target:
            return None
        missing = " and ".join(n for n, v in (("training_data", self.training_data),
                                               ("target", self.target)) if not v)
        return (f"no labelled data configured for model {model_name!r}: the RetrainingPolicy "
                f"lacks {missing}; save one, e.g. RetrainingPolicy(training_data='s3://bucket/"
                f"labels/', target='churn').save({document or document_name(model_name)!r}, "
                "overwrite=True)")

    def labelled_data(self, model_name: str, document: str | None = None) -> tuple[str, str]:
        """(training_data, target), or ConfigurationError saying where to configure them."""
        problem = self.labelled_data_problem(model_name, document)
        if problem:
            raise ConfigurationError(problem)
        return self.training_data, self.target


def document_name(model_name: str) -> str:
    """Block document names allow lowercase letters, digits and dashes: the model's slug."""
    from tasks.registry import model_slug

    return model_slug(model_name)


def resolve_retraining_policy(model_name: str, name: str | None = None) -> RetrainingPolicy:
    """The saved document `name` (an error when absent), else the model's own document, else
    `default`, else the built-in defaults."""
    candidates = [name] if name else [document_name(model_name), DEFAULT_DOCUMENT]
    for candidate in candidates:
        policy = load_saved(RetrainingPolicy, candidate)
        if policy is not None:
            return policy
    if name:
        raise ConfigurationError(
            f"no saved RetrainingPolicy document named {name!r}; save one with "
            f"RetrainingPolicy(...).save({name!r}) or leave policy empty to use the model's own "
            f"document ({document_name(model_name)!r}) or 'default'")
    return RetrainingPolicy()
