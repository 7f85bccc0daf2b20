-- Run once by the postgres image on an empty data directory. POSTGRES_DB creates `mlflow`
-- (MLflow's backend store); Prefect's server gets a database of its own.
CREATE DATABASE prefect;
