-- Month-to-date LLM spend per organisation, kept by the inference-log writer in the same
-- statement that inserts the log rows. Budget checks read one row by primary key instead of
-- summing a month of inference_logs (which grows by millions of rows a day at gateway rates).
CREATE TABLE llm_spend (
    org_id  uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    -- First day of the month, UTC.
    month   date NOT NULL,
    usd     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, month)
);

INSERT INTO llm_spend (org_id, month, usd)
SELECT org_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date, sum(cost_usd)
FROM inference_logs
GROUP BY 1, 2;
