-- DuckDB: every night of an output folder as one view. Replace {output} with the OUTPUT folder.
-- union_by_name reads shards of older schema versions too (their newer columns are NULL);
-- hive_types pins run_date to DATE rather than leaving it to DuckDB's guess.
CREATE OR REPLACE VIEW predictions AS
SELECT *
FROM read_parquet(
    '{output}/**/*.parquet',
    hive_partitioning = true,
    union_by_name = true,
    hive_types = {'run_date': 'DATE'}
);
