-- A second database for MLflow beside Prefect's (POSTGRES_DB); run once, when the volume is created.
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
