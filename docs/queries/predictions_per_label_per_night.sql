-- How many images each class won, night by night (rows with status 'ok' only).
-- Reads the table or view `predictions` (docs/warehouse.md), partitioned by run_date.
SELECT
    run_date,
    label,
    label_name,
    count(*) AS images
FROM predictions
WHERE status = 'ok'
GROUP BY run_date, label, label_name
ORDER BY run_date, images DESC, label;
