-- Images, errors and the error rate of each night. Every input file is one row, so these are
-- counts of files, not of successful predictions.
SELECT
    run_date,
    count(*) AS images,
    sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
    avg(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END) AS error_rate
FROM predictions
GROUP BY run_date
ORDER BY run_date;
