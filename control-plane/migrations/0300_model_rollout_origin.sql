-- Who started a model rollout (issue 14): `api` (POST .../model-rollouts, kipctl) or `mlflow`
-- (the MLflow `challenger` alias poller: a shadow rollout of the challenger beside the
-- champion on each device group that runs the model). The poller only ever changes the
-- rollouts it started; one started through the API on a group keeps that group.
ALTER TABLE model_rollouts ADD COLUMN origin text NOT NULL DEFAULT 'api'
    CHECK (origin IN ('api', 'mlflow'));
