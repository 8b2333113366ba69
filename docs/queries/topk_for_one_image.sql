-- The k best classes of one image, best first, for every night that classified it.
-- Parameter $path: the image's path relative to the input folder, as in the path column.
-- DuckDB syntax: several unnest() calls in one SELECT are zipped side by side (BigQuery:
-- UNNEST(topk_labels) WITH OFFSET; Snowflake: LATERAL FLATTEN; Athena: CROSS JOIN UNNEST ... WITH ORDINALITY).
SELECT
    run_date,
    run_id,
    unnest(range(1, len(topk_labels) + 1)) AS rank,
    unnest(topk_labels) AS label,
    unnest(topk_probs) AS prob
FROM predictions
WHERE path = $path AND status = 'ok'
ORDER BY run_date, rank;
