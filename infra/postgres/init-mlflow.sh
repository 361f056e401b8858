#!/bin/sh
# A second database for MLflow beside Prefect's (POSTGRES_DB), its password from MLFLOW_DB_PASSWORD; run once by
# the postgres image's entrypoint, when the volume is created (psql as POSTGRES_USER, PGHOST/PGPORT where set).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER mlflow WITH PASSWORD :'password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
