-- DuckDB: the input folder's current state from incremental nights: the latest row of every path across all
-- nights, files deleted since left out. Replace {output} with the OUTPUT folder.
-- A night's rows share its run_started_at (when it was planned, to the microsecond), and nights are planned one
-- at a time, so the newest run_started_at of a path is its latest row. Rows of schema v1 have none: oldest.
CREATE OR REPLACE VIEW current_state AS
SELECT * EXCLUDE (latest)
FROM (
    SELECT *, row_number() OVER (PARTITION BY path ORDER BY run_started_at DESC NULLS LAST) AS latest
    FROM read_parquet(
        '{output}/**/*.parquet',
        hive_partitioning = true,
        union_by_name = true,
        hive_types = {'run_date': 'DATE'}
    )
)
WHERE latest = 1 AND status <> 'deleted';
